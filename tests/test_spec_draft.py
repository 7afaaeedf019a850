"""Draft-model proposals (raylm.workers.draft_runner): greedy proposals are the draft
model's own greedy continuation (transformers as the oracle); a draft equal to the
target proposes the target's next tokens (all accepted); q is the filtered softmax of
the draft's logits; after a rejection the draft's cache is rewritten as a fresh run
would have it, also when the rejected positions' block left the table."""
import pytest
import torch
from transformers import AutoConfig

from raylm.workers.draft_runner import DraftModelRunner, check_vocab
from raylm.workers.messages import SamplingOptions
from raylm.workers.model_runner import ModelRunner
from raylm.workers.sampler import SamplingState, _filter
from raylm.workers.spec_verify import verify_rejection
from tests.helpers import hf_greedy, hf_model, make_checkpoint

BS = 4  # small blocks: proposals cross block boundaries
K = 4
GREEDY = SamplingOptions(temperature=0.0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_draft")
    return {"target": make_checkpoint(str(root / "target"), "llama", seed=3),
            "draft": make_checkpoint(str(root / "draft"), "llama", seed=4, num_hidden_layers=1,
                                     hidden_size=32, intermediate_size=64)}


def runners(target_dir, draft_dir, k=K, num_blocks=96):
    target = ModelRunner(target_dir, AutoConfig.from_pretrained(target_dir), torch.float32, "cpu", BS)
    target.allocate_kv_cache(num_blocks)
    draft = DraftModelRunner(target, draft_dir, AutoConfig.from_pretrained(draft_dir), k)
    draft.allocate_kv_cache(num_blocks)
    return target, draft


def give_blocks(target, rid, first, n):
    target.block_tables[rid] = list(range(first, first + n))


@torch.no_grad()
def hf_logits(path, ids):
    return hf_model(path)(torch.tensor([ids])).logits[0].float()


PROMPTS = [[5, 17, 9, 40, 2, 77, 31], [100, 3, 3, 8], [250, 12, 60, 61, 62, 63, 64, 65, 66, 7, 1]]


def test_greedy_proposals_are_the_drafts_greedy_continuation(dirs):
    target, draft = runners(dirs["target"], dirs["draft"])
    rids = ["a", "b", "c"]
    for i, rid in enumerate(rids):
        give_blocks(target, rid, 10 * i, 8)
    out = draft.propose(rids, PROMPTS, [GREEDY] * 3)
    for p, props in zip(PROMPTS, out.token_ids):
        assert props == hf_greedy(dirs["draft"], p, K)[0]
    # q is one-hot at each greedy proposal.
    assert out.draft_probs.shape == (3 * K, target.hf_config.vocab_size)
    flat = [t for props in out.token_ids for t in props]
    assert out.draft_probs.argmax(dim=1).tolist() == flat
    assert torch.equal(out.draft_probs.sum(dim=1), torch.ones(3 * K))


def test_draft_equal_to_target_proposes_the_targets_tokens(dirs):
    target, draft = runners(dirs["target"], dirs["target"])
    tokens = [list(p) for p in PROMPTS]
    rids = ["a", "b", "c"]
    for i, rid in enumerate(rids):
        give_blocks(target, rid, 20 * i, 16)
    for _ in range(3):  # propose, accept everything plus the target's next token, repeat
        out = draft.propose(rids, tokens, [GREEDY] * 3)
        logits = torch.cat([hf_logits(dirs["target"], t + props)[len(t) - 1:]
                            for t, props in zip(tokens, out.token_ids)])
        states = [SamplingState(list(t), GREEDY) for t in tokens]
        res = verify_rejection(logits, states, out.token_ids, out.draft_probs)
        assert res.num_accepted == [K] * 3
        for t, props, emitted in zip(tokens, out.token_ids, res.tokens):
            assert props == hf_greedy(dirs["target"], t, K)[0]
            t.extend(emitted)


@pytest.mark.parametrize("options", [
    SamplingOptions(temperature=0.8, seed=7),
    SamplingOptions(temperature=1.2, top_k=20, top_p=0.9, seed=8),
    SamplingOptions(temperature=0.7, min_p=0.05),
])
def test_q_is_the_filtered_softmax_of_the_drafts_logits(dirs, options):
    target, draft = runners(dirs["target"], dirs["draft"])
    give_blocks(target, "a", 0, 8)
    prompt = PROMPTS[0]
    out = draft.propose(["a"], [prompt], [options])
    props, q = out.token_ids[0], out.draft_probs
    assert len(props) == K
    assert torch.allclose(q.sum(dim=1), torch.ones(K), atol=1e-5)
    ref = hf_logits(dirs["draft"], prompt + props)[len(prompt) - 1:len(prompt) - 1 + K]
    expect = _filter(ref, [SamplingState([], options)] * K).softmax(dim=1)
    assert torch.allclose(q, expect, atol=1e-5)
    for j, t in enumerate(props):
        assert q[j, t] > 0  # every proposal was drawn from q


def test_seeded_proposals_depend_only_on_seed_and_position(dirs):
    options = SamplingOptions(temperature=1.0, seed=123)
    target, draft = runners(dirs["target"], dirs["draft"])
    give_blocks(target, "a", 0, 8)
    alone = draft.propose(["a"], [PROMPTS[0]], [options]).token_ids[0]
    target2, draft2 = runners(dirs["target"], dirs["draft"])
    for i, rid in enumerate(["x", "a", "y"]):
        give_blocks(target2, rid, 10 * i, 8)
    batch = draft2.propose(["x", "a", "y"], [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                           [SamplingOptions(temperature=1.0), options, GREEDY])
    assert batch.token_ids[1] == alone


@pytest.mark.parametrize("move_block", [False, True])
def test_rejected_positions_are_rewritten_like_a_fresh_run(dirs, move_block):
    options = SamplingOptions(temperature=0.9, seed=5)
    target, draft = runners(dirs["target"], dirs["draft"])
    prompt = PROMPTS[2]  # 11 tokens: proposals at positions 11..14 cross into block 3
    give_blocks(target, "a", 0, 4)
    first = draft.propose(["a"], [prompt], [options]).token_ids[0]
    # The target accepts one proposal and samples a different token after it.
    bonus = (first[1] + 1) % target.hf_config.vocab_size
    tokens = prompt + [first[0], bonus]
    if move_block:  # blocks 2.. went back to the pool (a rollback), new ones came
        target.block_tables["a"] = target.block_tables["a"][:2] + [50, 51, 52]
    # The catch-up restarts at the rejected position 12 (the accepted proposal at 11 was
    # fed back), or at block 2's first position when that block left the table.
    assert draft._valid("a", tokens, target.block_tables["a"]) == (8 if move_block else 12)
    second = draft.propose(["a"], [tokens], [options])
    _, fresh = runners(dirs["target"], dirs["draft"])
    fresh.runner.block_tables["a"] = list(target.block_tables["a"])
    ref = fresh.propose(["a"], [tokens], [options])
    assert second.token_ids == ref.token_ids
    assert torch.allclose(second.draft_probs, ref.draft_probs, atol=1e-5)


def test_proposals_stop_at_the_tables_slots(dirs):
    target, draft = runners(dirs["target"], dirs["draft"])
    prompt = PROMPTS[0]  # 7 tokens; positions 7, 8, 9 need a third block
    give_blocks(target, "a", 0, 2)  # slots for positions 0..7
    out = draft.propose(["a"], [prompt], [GREEDY])
    assert out.token_ids[0] == hf_greedy(dirs["draft"], prompt, K)[0][:2]
    one = draft.propose(["a"], [prompt], [GREEDY], max_num_tokens=[1])
    assert one.token_ids == [out.token_ids[0][:1]]
    give_blocks(target, "b", 10, 1)  # 4 slots: room for the 4th token's KV, one proposal
    assert len(draft.propose(["b"], [PROMPTS[1]], [GREEDY]).token_ids[0]) == 1
    out = draft.propose(["b"], [PROMPTS[1] + [9]], [GREEDY])  # the newest token has no slot
    assert out.token_ids == [[]] and out.draft_probs.shape[0] == 0


def test_vocab_mismatch_names_both_sizes(dirs, tmp_path):
    other = make_checkpoint(str(tmp_path / "other"), "llama", seed=1)
    cfg = AutoConfig.from_pretrained(other)
    cfg.vocab_size = 999
    with pytest.raises(ValueError, match=r"vocab_size 999.*vocab_size 3\d\d"):
        check_vocab(AutoConfig.from_pretrained(dirs["target"]), cfg)


def _config_only(src, dst, **changes):
    """A checkpoint directory holding only `src`'s config.json with `changes`."""
    import json
    import os

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_engine_resolves_and_checks_the_draft(dirs, tmp_path):
    from raylm.engine.spec_decode.config import parse_speculative_config
    from raylm.engine.spec_decode.draft import num_kv_blocks, num_lookahead_tokens, resolve_draft_model

    def spec(model, **kw):
        return parse_speculative_config({"method": "draft_model", "model": model,
                                         "num_speculative_tokens": 3, **kw})

    target = AutoConfig.from_pretrained(dirs["target"])
    out = resolve_draft_model(spec(dirs["draft"]), target, 512)
    assert (out.method, out.model_dir, out.num_speculative_tokens) == ("draft_model", dirs["draft"], 3)
    assert num_lookahead_tokens(spec(dirs["draft"])) == 3
    ngram = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert num_lookahead_tokens(ngram) == 0
    assert num_lookahead_tokens(None) == 0
    assert num_kv_blocks(1000, 60, 40) == 10
    with pytest.raises(ValueError, match="max_position_embeddings is 512; max_model_len is 1024"):
        resolve_draft_model(spec(dirs["draft"]), target, 1024)
    small = _config_only(dirs["draft"], str(tmp_path / "v"), vocab_size=999)
    with pytest.raises(ValueError, match=r"vocab_size 999; the target model has vocab_size 3\d\d"):
        resolve_draft_model(spec(small), target, 512)
    solo = resolve_draft_model(spec(dirs["draft"], draft_tensor_parallel_size=1), target, 512, 2)
    assert solo.draft_tensor_parallel_size == 1  # the draft runs whole on TP rank 0
    assert resolve_draft_model(spec(dirs["draft"], draft_tensor_parallel_size=1), target, 512,
                               1).draft_tensor_parallel_size is None  # no TP: nothing to say
    assert resolve_draft_model(spec(dirs["draft"], draft_tensor_parallel_size=2), target, 512,
                               2).draft_tensor_parallel_size is None  # sharded like the target
    with pytest.raises(ValueError, match=r"draft_tensor_parallel_size'\] is 3; it must be 1 or the "
                                         r"target's tensor_parallel_size \(2\)"):
        resolve_draft_model(spec(dirs["draft"], draft_tensor_parallel_size=3), target, 512, 2)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_draft_model(spec(str(tmp_path / "nowhere")), target, 512)


def test_proposal_store_keeps_q_until_verification():
    from raylm.workers.draft_runner import ProposalStore, Proposals

    store = ProposalStore()
    q = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    store.put(["a", "b", "c"], Proposals([[1, 2, 0], [], [2, 2]], q))
    # The scheduler trimmed a's proposals to two; c's go unverified this step.
    assert torch.equal(store.take(["a"], [[1, 2]]), q[:2])
    with pytest.raises(RuntimeError, match=r"verifies proposals \[1\]; the draft proposed \[\]"):
        store.take(["b"], [[1]])
    with pytest.raises(RuntimeError, match=r"proposed \[2, 2\]"):
        store.take(["c"], [[2, 1]])
    store.put(["c"], Proposals([[0]], q[:1]))
    store.drop(["c"])
    with pytest.raises(RuntimeError, match="proposed"):
        store.take(["c"], [[0]])


def test_changed_tables_reset_the_graph_row_and_appends_do_not(dirs):
    from raylm.workers.draft_runner import _first_change

    assert _first_change([1, 2, 3, 4], (1, 2, 3)) == 3  # appended: nothing changed
    assert _first_change([1, 2, 9, 4], (1, 2, 3, 4)) == 2
    assert _first_change([1, 2], (1, 2, 3)) == 2  # truncated

    class Rows:  # records what the draft asks of the decode graphs' host block tables
        dropped = []

        def drop(self, ids):
            self.dropped.extend(ids)

    target, draft = runners(dirs["target"], dirs["draft"])
    draft.runner.host_tables = Rows()
    give_blocks(target, "a", 0, 4)
    tokens = list(PROMPTS[2])
    first = draft.propose(["a"], [tokens], [GREEDY]).token_ids[0]
    target.block_tables["a"].append(40)  # grown: the row appends
    tokens += first[:2]
    second = draft.propose(["a"], [tokens], [GREEDY]).token_ids[0]
    assert Rows.dropped == []
    target.block_tables["a"][3:] = [41, 42]  # a rollback gave block 3 back, 41 came
    draft.propose(["a"], [tokens + second[:1]], [GREEDY])
    assert Rows.dropped == ["a"]


def test_a_solo_draft_lives_on_rank_0_alone(dirs):
    """draft_tensor_parallel_size 1 at TP 2: a rank > 0 builds no draft, counts no draft
    KV and returns from after_step at once, with no collective call (none is set up
    here, so one would fail)."""
    from types import SimpleNamespace

    from raylm.workers.spec_proposer import WorkerProposer

    rank1 = SimpleNamespace(tp_rank=1, tp_size=2)
    spec = {"method": "draft_model", "model_dir": dirs["draft"], "num_speculative_tokens": 2,
            "draft_tensor_parallel_size": 1}
    p = WorkerProposer(rank1, spec)
    assert p.proposer is None and p.kv_bytes_per_block() == 0
    p.allocate_kv_cache(8)
    p.drop(["r"])
    assert p.after_step(SimpleNamespace(spec_wanted={"r": 2}), [0, 1], None, None) == {}
    p.release_kv_cache()
