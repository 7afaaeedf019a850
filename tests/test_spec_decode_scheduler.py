"""Speculative decoding in the scheduler: proposals scheduled after the last token,
trimmed to the budget, blocks, max_tokens and max_model_len, rolled back when rejected,
never hashed into the prefix cache. Pure Python, no model."""
import random

import pytest

from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import Request, RequestStatus
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=32, block_size=4, prefix=True, **cfg):
    bm = BlockManager(num_blocks, block_size, prefix)
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 64, **cfg})
    return Scheduler(config, bm), bm


def oracle(tokens):
    """The 'model': a deterministic next token of the tokens so far."""
    return (sum(tokens[-3:]) * 7 + len(tokens)) % 50 + 1


def step(sched, accept=None, worker_tables=None):
    """Plan one step and play the model: each proposal is accepted while it equals the
    oracle's token; the rows append the accepted proposals and the token after them.
    `worker_tables`: a worker's copy of the block tables, kept by diffs as the planner
    sends them (new ids past what it holds; preempted and truncated tables cut first)."""
    out = sched.schedule()
    if worker_tables is not None:
        for rid in out.preempted_ids:
            worker_tables.pop(rid, None)
        for rid, n in out.truncated_block_tables.items():
            if rid in worker_tables:
                del worker_tables[rid][n:]
        for s in out.seqs:
            held = worker_tables.setdefault(s.request_id, [])
            held += s.block_table[len(held):]
            assert held == s.block_table, "a diff-kept table went stale"
    accepted, emitted = {}, {}
    for s in out.seqs:
        if not s.sample:
            continue
        req = sched.requests[s.request_id]
        toks, new = list(req.token_ids), []
        for p in s.spec_token_ids:
            if oracle(toks) != p or (accept is not None and len(new) >= accept):
                break
            toks.append(p)
            new.append(p)
        accepted[s.request_id] = len(new)
        emitted[s.request_id] = new + [oracle(toks)]
    sched.update_after_step(out, {r: a for r, a in accepted.items()
                                  if any(s.request_id == r and s.spec_token_ids for s in out.seqs)})
    for rid, toks in emitted.items():
        for t in toks:
            sched.requests[rid].append_output_token(t)
    return out


def assert_no_leak(bm):
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def decoding(sched, prompts, **kw):
    """Add the requests and prefill them in one step: each then decodes, with one output."""
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, **kw.get(rid, {})))
    step(sched)
    return [sched.requests[rid] for rid in prompts]


def test_proposals_follow_the_last_token_and_count_in_the_budget():
    sched, bm = make()
    (req,) = decoding(sched, {"a": [1, 2, 3, 4, 5]})
    last = req.token_ids[-1]
    req.spec_token_ids = [11, 12, 13]
    out = sched.schedule()
    (s,) = out.seqs
    assert s.token_ids == [last, 11, 12, 13] and s.spec_token_ids == [11, 12, 13]
    assert s.start_pos == 5 and s.sample
    assert out.num_scheduled_tokens == {"a": 4} and out.num_spec_tokens == 3
    assert len(req.block_ids) == bm.blocks_needed(5 + 4)  # positions 5..8 have slots
    assert req.spec_token_ids == []  # consumed
    sched.update_after_step(out, {"a": 0})
    assert req.num_computed_tokens == 6 and len(req.block_ids) == 2
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert_no_leak(bm)


def test_budget_trims_proposals_and_never_preempts():
    sched, bm = make(max_num_batched_tokens=6)
    a, b = decoding(sched, {"a": [1, 2, 3], "b": [4, 5, 6]})
    a.spec_token_ids = [9, 9, 9, 9]
    b.spec_token_ids = [8, 8, 8]
    out = sched.schedule()
    # Both base rows first (2 tokens), then a's 4 proposals take the other 4.
    assert out.num_scheduled_tokens == {"a": 5, "b": 1}
    assert [list(s.spec_token_ids) for s in out.seqs] == [[9, 9, 9, 9], []]
    assert not out.preempted_ids and out.total_num_scheduled_tokens == 6
    sched.update_after_step(out, {"a": 1})
    assert a.num_computed_tokens == 3 + 1 + 1 and b.num_computed_tokens == 4


def test_short_blocks_trim_proposals_without_preempting():
    sched, bm = make(num_blocks=4, block_size=4)
    a, b = decoding(sched, {"a": [1, 2, 3, 4, 5, 6], "b": [7, 8, 9]})  # 2 blocks and 1
    assert bm.num_free_blocks == 1
    a.spec_token_ids = list(range(20, 30))
    out = sched.schedule()
    # a computes position 6 (block 1 has room for 7) plus proposals at 7..11 (one free block).
    assert not out.preempted_ids and len(out.seqs) == 2
    assert out.num_scheduled_tokens == {"a": 1 + 5, "b": 1}
    assert bm.num_free_blocks == 0 and len(a.block_ids) == 3 and len(b.block_ids) == 1
    sched.update_after_step(out, {"a": 0})
    assert bm.num_free_blocks == 1  # the block that held only rejected proposals
    sched.abort_requests(["a", "b"])
    assert_no_leak(bm)


def test_max_tokens_and_max_model_len_cap_proposals():
    sched, bm = make(max_model_len=12)
    # a: 1 output of at most 4; b: 10 tokens of at most 12.
    a, b = decoding(sched, {"a": [1, 2, 3], "b": [1, 2, 3, 4, 5, 6, 7, 8, 9]},
                    a={"max_output_tokens": 4})
    a.spec_token_ids = [5, 5, 5, 5, 5]
    b.spec_token_ids = [5, 5, 5, 5, 5]
    out = sched.schedule()
    # a may emit 3 more tokens (1 sampled + 2 proposals); b may reach 12 tokens.
    assert {s.request_id: len(s.spec_token_ids) for s in out.seqs} == {"a": 2, "b": 1}
    sched.update_after_step(out, {"a": 2, "b": 1})
    a.output_token_ids += [0, 0, 0]  # what the engine would append (3 tokens)
    a.token_ids += [0, 0, 0]
    assert a.num_output_tokens == a.max_output_tokens


def test_rejected_proposals_free_their_blocks_and_are_never_hashed():
    sched, bm = make(num_blocks=16, block_size=4)
    (req,) = decoding(sched, {"a": [1, 2, 3]})           # 4 tokens; block 0 full after the next step
    start_free = bm.num_free_blocks
    req.spec_token_ids = [40, 41, 42, 43, 44]       # positions 4..8: blocks 1 and 2
    out = sched.schedule()
    assert len(req.block_ids) == 3 and bm.num_free_blocks == start_free - 2
    sched.update_after_step(out, {"a": 0})
    req.append_output_token(45)                     # the target's token at position 4
    assert req.num_computed_tokens == 4 and len(req.block_ids) == 1
    assert bm.num_free_blocks == start_free
    # Block 0 is full of verified tokens: hashed. Nothing holds the proposals.
    assert len(bm.hash_to_block) == 1 and bm.blocks[req.block_ids[0]].tokens == tuple(req.token_ids[:4])
    assert all(40 not in (b.tokens or ()) for b in bm.blocks)
    # The next plan says which table lost its tail (workers drop their copy of it).
    out = sched.schedule()
    assert out.truncated_block_tables == {"a": 1} and len(req.block_ids) == 2
    assert sched.schedule().truncated_block_tables == {}
    # A prompt made of the verified tokens plus the rejected proposals hits one block only.
    probe = Request("p", req.token_ids[:4] + [40, 41, 42, 43, 44, 46])
    assert len(bm.find_cached_prefix(probe)) == 1
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert_no_leak(bm)


def test_partly_accepted_proposals_keep_their_block_and_hash_once_verified():
    sched, bm = make(num_blocks=16, block_size=4)
    (req,) = decoding(sched, {"a": [1, 2, 3]})
    req.spec_token_ids = [40, 41, 42, 43, 44]
    out = sched.schedule()
    sched.update_after_step(out, {"a": 3})          # 40, 41, 42 accepted, 43 corrected
    for t in (40, 41, 42, 50):
        req.append_output_token(t)
    # positions 0..6 computed; 7 (the corrected token) is next; block 2 (8..) freed.
    assert req.num_computed_tokens == 7 and len(req.block_ids) == 2
    assert len(bm.hash_to_block) == 1               # block 1 is not full of computed tokens
    out = sched.schedule()
    assert out.seqs[0].token_ids == [50] and out.seqs[0].start_pos == 7
    sched.update_after_step(out)
    req.append_output_token(51)
    assert len(bm.hash_to_block) == 2               # now block 1 holds 40, 41, 42, 50
    assert bm.blocks[req.block_ids[1]].tokens == (40, 41, 42, 50)


def test_preemption_drops_proposals_and_pending_rows_get_none():
    sched, bm = make(num_blocks=3, block_size=4)
    a, b = decoding(sched, {"a": list(range(1, 9)), "b": [1, 2, 3]})  # 2 blocks and 1
    b.spec_token_ids = [9, 9]
    a.spec_token_ids = [9, 9, 9, 9]
    out = sched.schedule()  # a's position 8 needs a third block: b is preempted for it
    assert out.preempted_ids == ["b"] and b.spec_token_ids == [] and not b.block_ids
    # a's proposals use the room left in that block (positions 9..11), no more.
    assert out.num_scheduled_tokens == {"a": 4} and out.seqs[0].spec_token_ids == [9, 9, 9]
    sched.update_after_step(out, {"a": 0})
    a.append_output_token(1)
    a.append_placeholder()  # asynchronous scheduling: its next input is not known yet
    a.spec_token_ids = [3]
    out = sched.schedule()
    assert all(not s.spec_token_ids for s in out.seqs)


def test_accept_counts_are_required_and_checked():
    sched, bm = make()
    (req,) = decoding(sched, {"a": [1, 2, 3]})
    req.spec_token_ids = [1, 2]
    out = sched.schedule()
    with pytest.raises(ValueError, match="num_accepted"):
        sched.update_after_step(out)
    with pytest.raises(ValueError, match=r"num_accepted\['a'\] is 3.*\[0, 2\]"):
        sched.update_after_step(out, {"a": 3})
    sched.update_after_step(out, {"a": 2})
    assert req.num_computed_tokens == 6 and sched.num_draft_tokens == 2 and sched.num_accepted_tokens == 2


def test_speculation_gives_the_tokens_of_plain_decoding_in_shared_steps():
    """Requests with and without proposals, with different k, long prompts in chunks,
    under block pressure: same tokens as without speculation, block tables that cover the
    computed positions, and every block back at the end."""
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(1, 50) for _ in range(rng.randrange(3, 30))] for i in range(6)}

    def run(k_of):
        sched, bm = make(num_blocks=24, block_size=4, max_num_batched_tokens=20, max_model_len=60)
        for rid, p in prompts.items():
            sched.add_request(Request(rid, p, max_output_tokens=25))
        done, mixed_spec, worker_tables = {}, 0, {}
        for _ in range(400):
            for rid, req in sched.requests.items():
                k = k_of(rid)
                if k and not req.is_prefilling:  # half right, then noise
                    toks, spec = list(req.token_ids), []
                    for j in range(k):
                        t = oracle(toks) if rng.random() < 0.6 else rng.randrange(1, 50)
                        spec.append(t)
                        toks.append(t)
                    req.spec_token_ids = spec
            out = step(sched, worker_tables=worker_tables)
            mixed_spec += out.num_spec_tokens > 0 and any(not s.spec_token_ids for s in out.seqs)
            for rid, req in list(sched.requests.items()):
                assert len(req.block_ids) * 4 >= req.num_computed_tokens
                end = req.num_output_tokens >= 25 or req.num_tokens >= 60
                if end:
                    done[rid] = req.token_ids[:min(60, req.num_prompt_tokens + 25)]
                    sched.finish_request(rid, RequestStatus.FINISHED_LENGTH)
                    worker_tables.pop(rid, None)
            if not sched.has_unfinished_requests():
                break
        assert_no_leak(bm)
        return done, sched, mixed_spec

    plain, _, _ = run(lambda rid: 0)
    spec, sched, mixed = run(lambda rid: int(rid[1:]) % 4)  # k = 0, 1, 2, 3
    assert spec == plain and len(plain) == 6
    assert sched.num_accepted_tokens > 0 and sched.num_draft_tokens > sched.num_accepted_tokens
    assert mixed > 0 and sched.num_preemptions > 0  # shared steps, block pressure


def test_lookahead_slots_are_held_and_rejected_blocks_kept_for_model_proposers():
    """num_lookahead_tokens (a draft model or EAGLE head writes its proposals' KV past
    the row before the engine sees them): each row holds that many more slots (never past
    max_model_len), and rejected proposals' blocks stay with the request, unhashed."""
    sched, bm = make(num_blocks=16, block_size=4, num_lookahead_tokens=3)
    (req,) = decoding(sched, {"a": [1, 2, 3]})      # prefill of 3 held 3 + 3 slots: 2 blocks
    assert len(req.block_ids) == 2
    req.spec_token_ids = [40, 41, 42]               # row of 4 at positions 3..6, then 3 slots
    out = sched.schedule()
    assert out.seqs[0].spec_token_ids == [40, 41, 42] and len(req.block_ids) == 3
    sched.update_after_step(out, {"a": 0})
    req.append_output_token(45)
    assert req.num_computed_tokens == 4 and len(req.block_ids) == 3  # kept, not truncated
    assert len(bm.hash_to_block) == 1 and all(40 not in (b.tokens or ()) for b in bm.blocks)
    assert sched.schedule().truncated_block_tables == {}
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert_no_leak(bm)
    # Near max_model_len the lookahead shrinks instead of asking for blocks past it.
    sched, bm = make(num_blocks=16, block_size=4, num_lookahead_tokens=3, max_model_len=8)
    (req,) = decoding(sched, {"b": [1, 2, 3, 4, 5, 6]})
    assert len(req.block_ids) == 2


def test_lookahead_never_changes_the_tokens_of_plain_decoding():
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(1, 50) for _ in range(rng.randrange(2, 12))] for i in range(5)}
    outs = []
    for look in (0, 2):
        sched, bm = make(num_blocks=40, block_size=4, num_lookahead_tokens=look, max_model_len=48)
        for rid, p in prompts.items():
            sched.add_request(Request(rid, p, max_output_tokens=20))
        done = {}
        while sched.has_unfinished_requests():
            for req in sched.running:
                toks = list(req.token_ids)
                req.spec_token_ids = []
                for _ in range(3):  # half right: the oracle's token, then a wrong one
                    req.spec_token_ids.append(oracle(toks) if len(req.spec_token_ids) % 2 == 0 else 0)
                    toks.append(req.spec_token_ids[-1])
            step(sched)
            for req in list(sched.running):
                if req.num_output_tokens >= 20:
                    done[req.request_id] = req.output_token_ids[:20]
                    sched.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
        outs.append(done)
        assert_no_leak(bm)
    assert outs[0] == outs[1]
