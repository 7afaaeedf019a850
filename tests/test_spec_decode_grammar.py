"""Speculative decoding of structured-output requests: a grammar request's proposals are
cut by its grammar, every verified position samples under the grammar's mask at that
point, and the matcher advances over the emitted tokens only.

N-gram proposals (one-hot verification) are cut to the longest prefix the grammar
accepts: JSON schema, regex and choice requests give token for token the outputs of
constrained decoding without speculation (greedy and seeded), with proposals accepted,
next to unconstrained speculating requests. A draft model's or EAGLE-3 head's proposals
(rejection sampling) are kept through the first one the grammar refuses or that ends it:
greedy outputs are those of constrained decoding without speculation, seeded ones do
not depend on the batch, and sampled outputs follow the constrained target's
distribution (chi-square against exact marginals of a 12-token vocabulary model; the
n-gram cut applied to drafted proposals fails that test). The outputs stay valid."""
import json
import re
import time

import jsonschema
import pytest
import torch
from transformers import AutoConfig

from raylm import LLM, SamplingParams, StructuredOutputsParams
from tests.helpers import hf_model, make_checkpoint, make_tokenizer
from tests.test_spec_decode_models import PROMPT, V, chi2, perturbed_copy, tiny_vocab_model
from tests.test_spec_decode_models import run as run_models
from tests.test_spec_eagle3 import save_head
from tests.test_structured_outputs import grammar_accepts, output_text

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}
REGEX = r"(ab|cd| )+\."
CHOICES = ["to be or not to be, to be or not to be", "no"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def cyc_dir(tmp_path_factory):
    """A llama whose greedy decoding repeats itself (as in tests/test_spec_decode.py)."""
    return make_checkpoint(str(tmp_path_factory.mktemp("specg") / "cyc"), "llama", seed=5,
                           initializer_range=0.05)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def requests(seed):
    temp = 0.0 if seed is None else 1.0

    def sp(**kw):
        return SamplingParams(temperature=temp, seed=seed, max_tokens=MAX_TOKENS,
                              structured_outputs=StructuredOutputsParams(**kw) if kw else None)
    return [('{"name": "abab abab abab abab abab", "ok": true} {"name": "abab abab', sp(json=SCHEMA)),
            ("ab ab cd ab ab cd ab ab cd ab ab cd", sp(regex=REGEX)),
            ("to be or not to be, to be or not", sp(choice=CHOICES)),
            ("the the the the the the the", sp())]


def run(model_dir, reqs, spec):
    llm = LLM(model_dir, speculative_config=spec, dtype="float32", max_model_len=256)
    try:
        outs = llm.generate([p for p, _ in reqs], [s for _, s in reqs], use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], llm.stats()
    finally:
        llm.shutdown()


def check_valid(tok, reqs, outs):
    for (_, sp), (ids, reason) in zip(reqs, outs):
        so = sp.structured_outputs
        if so is None:
            continue
        assert grammar_accepts(tok, so, ids)
        if reason != "stop":
            continue
        text = output_text(tok, ids)
        if so.json is not None:
            jsonschema.validate(json.loads(text, strict=False), so.json)
        elif so.regex is not None:
            assert re.fullmatch(so.regex, text), text
        else:
            assert text in so.choice


def accepted(stats) -> int:
    assert stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    return stats["spec_decode_num_accepted_tokens"]


@pytest.mark.parametrize("seed", [None, 7])
def test_grammar_requests_speculate_exactly(cyc_dir, tok, seed):
    reqs = requests(seed)
    plain, _ = run(cyc_dir, reqs, None)
    outs, _ = run(cyc_dir, reqs, NGRAM)  # mixed with an unconstrained speculating request
    assert outs == plain
    check_valid(tok, reqs, outs)
    grammar_only, stats = run(cyc_dir, reqs[:3], NGRAM)
    assert grammar_only == plain[:3]
    assert accepted(stats) > 0, stats  # the grammar requests' proposals were verified and accepted


# ---- proposals drafted on the workers (draft model, EAGLE-3 head) --------------------
@pytest.fixture(scope="module")
def drafted(tmp_path_factory):
    """A target (small weights, as cyc_dir; 4 layers, for the EAGLE-3 head's 3 aux
    layers), its constrained greedy outputs without speculation, a near copy of it as
    the draft model and a random EAGLE-3 head."""
    root = tmp_path_factory.mktemp("specg_drafted")
    target = make_checkpoint(str(root / "target"), "llama", seed=5, num_hidden_layers=4,
                             initializer_range=0.05)
    save_head(str(root / "head"), AutoConfig.from_pretrained(target).vocab_size,
              eagle_aux_hidden_state_layer_ids=[0, 2, 3])
    specs = {"near": {"method": "draft_model", "model": perturbed_copy(target, str(root / "near"), 0.01),
                      "num_speculative_tokens": 3},
             "head": {"method": "eagle3", "model": str(root / "head"), "num_speculative_tokens": 3}}
    return target, specs, run(target, requests(None), None)[0]


@pytest.fixture
def cuts(monkeypatch):
    """Records (kept, accepted by the grammar, ended) of every cut of drafted proposals:
    kept > accepted when a proposal the grammar refuses was verified, ended when one that
    ends the grammar was."""
    from raylm.engine.spec_decode import core_steps, grammar

    seen = []

    def spy(matcher, proposals):
        kept = grammar.drafted_prefix(matcher, proposals)
        seen.append((kept, *grammar._accepted_run(matcher, proposals)))
        return kept
    monkeypatch.setattr(core_steps, "drafted_prefix", spy)
    return seen


@pytest.mark.parametrize("which", ["near", "head"])
def test_greedy_grammar_requests_with_drafted_proposals(drafted, tok, cuts, which):
    target, specs, plain = drafted
    reqs = requests(None)
    outs, _ = run(target, reqs, specs[which])  # mixed with an unconstrained speculating request
    assert outs == plain
    check_valid(tok, reqs, outs)
    grammar_only, stats = run(target, reqs[:3], specs[which])
    assert grammar_only == plain[:3]
    assert stats["spec_decode_num_draft_tokens"] > 0  # the grammar requests' drafts were verified
    assert any(kept > n for kept, n, _ in cuts)  # with a proposal the grammar refused
    if which == "near":
        assert 0 < accepted(stats) < stats["spec_decode_num_draft_tokens"], stats


def test_seeded_grammar_requests_with_a_draft_model_stay_valid(drafted, tok, monkeypatch):
    """Valid outputs, drafted proposals accepted, and a seeded request's tokens do not
    depend on its batch: with slow compiles the grammar requests are admitted while the
    unconstrained one runs, or while nothing does (alone), and get drafted proposals for
    their first decode either way."""
    from raylm.engine.grammar import GrammarManager

    compile_grammar = GrammarManager._compile

    def slow_compile(self, so):
        time.sleep(0.3)
        return compile_grammar(self, so)
    monkeypatch.setattr(GrammarManager, "_compile", slow_compile)
    target, specs, _ = drafted
    reqs = requests(7)
    outs, _ = run(target, reqs, specs["near"])
    check_valid(tok, reqs, outs)
    assert any(reason == "stop" for _, reason in outs[:3])
    num_accepted = 0
    for req, out in zip(reqs[:3], outs):
        alone, stats = run(target, [req], specs["near"])
        assert alone == [out]
        num_accepted += accepted(stats)
    assert num_accepted > 0  # the grammar requests' drafted proposals were accepted


# ---- the output distribution under sampling -------------------------------------------
LETTERS = "abcdefghij"  # tokens 2..11 of the tiny vocabulary (0 <bos>, 1 <eos>)
TINY_REGEX = "[ace]{1,3}"
TINY_LETTERS = [2, 4, 6]  # a, c, e
TINY_EOS = 1
TINY_N = 1500
ENDED = V  # the category of a position after the output ended
CHI2_CRITICAL = {2: 13.82, 3: 16.27, 4: 18.47}  # p = 0.001, by degrees of freedom


def tiny_vocab_grammar_model(path: str, seed: int, scale: float) -> str:
    """tiny_vocab_model with a one-character-per-token tokenizer, for grammars."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_vocab_model(path, seed, scale)
    vocab = {"<bos>": 0, "<eos>": TINY_EOS, **{c: i + 2 for i, c in enumerate(LETTERS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>").save_pretrained(path)
    return path


@torch.no_grad()
def constrained_marginals(model_dir: str) -> list[torch.Tensor]:
    """The distribution of output tokens 1, 2 and 3 (over the vocabulary and ENDED, the
    output ended before) when each is sampled from the target's softmax restricted to
    what TINY_REGEX allows: up to 3 of a, c, e, then the end (after at least one)."""
    model = hf_model(model_dir)

    def probs(ctx):
        allowed = (TINY_LETTERS if len(ctx) < 3 else []) + ([TINY_EOS] if ctx else [])
        logits = model(torch.tensor([PROMPT + ctx])).logits[0, -1].double()
        out = torch.zeros(V + 1, dtype=torch.float64)
        out[allowed] = torch.softmax(logits[allowed], -1)
        return out

    p1 = probs([])
    m2, m3 = torch.zeros(V + 1, dtype=torch.float64), torch.zeros(V + 1, dtype=torch.float64)
    for a in TINY_LETTERS:
        p2 = probs([a])
        m2 += p1[a] * p2
        m3[ENDED] += p1[a] * p2[TINY_EOS]
        for b in TINY_LETTERS:
            m3 += p1[a] * p2[b] * probs([a, b])
    return [p1, m2, m3]


def position_counts(outputs: list[list[int]], pos: int) -> list[int]:
    counts = [0] * (V + 1)
    for t in outputs:
        counts[t[pos] if pos < len(t) else ENDED] += 1
    return counts


def chi2_test(counts: list[int], expected: torch.Tensor) -> tuple[float, int]:
    """(chi-square, degrees of freedom) over the cells the grammar allows; the others
    must be empty."""
    cells = [i for i in range(len(counts)) if expected[i] > 0]
    assert all(counts[i] == 0 for i in range(len(counts)) if i not in cells), counts
    return chi2([counts[i] for i in cells], expected[cells]), len(cells) - 1


def sample_tiny(target: str, draft: str) -> tuple[list[list[int]], dict]:
    so = StructuredOutputsParams(regex=TINY_REGEX)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=4, structured_outputs=so)
              for s in range(TINY_N)]
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}
    outs, stats = run_models(target, [PROMPT] * TINY_N, params, spec=spec, max_model_len=64)
    return [o.outputs[0].token_ids for o in outs], stats


def test_sampled_grammar_outputs_with_a_draft_model_follow_the_constrained_target(tmp_path, cuts, monkeypatch):
    """Token 1 comes from the prompt's step; tokens 2 and 3 from verifying two drafted
    proposals (accepted, or rejected and resampled from the residual; refused by the
    grammar: rejected). Their marginals are those of the constrained target; cutting
    at the first refused proposal instead (the n-gram rule) is biased, and the test sees it."""
    from raylm.engine.spec_decode import core_steps, grammar

    target = tiny_vocab_grammar_model(str(tmp_path / "t"), seed=0, scale=0.6)
    # Another model, flatter: it over-weights some allowed letters, so that the residual
    # differs from the target's distribution and the n-gram cut's bias shows.
    draft = tiny_vocab_grammar_model(str(tmp_path / "d"), seed=1, scale=0.35)
    tokens, stats = sample_tiny(target, draft)
    assert stats["spec_decode_num_draft_tokens"] >= TINY_N, stats
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert any(kept > n for kept, n, _ in cuts) and any(ended for *_, ended in cuts)
    assert all(t[-1] == TINY_EOS and 2 <= len(t) <= 4 for t in tokens)  # letters, then the end
    expected = constrained_marginals(target)
    for pos in range(3):
        stat, dof = chi2_test(position_counts(tokens, pos), expected[pos])
        assert stat < CHI2_CRITICAL[dof], (pos, stat, position_counts(tokens, pos))
    monkeypatch.setattr(core_steps, "drafted_prefix", grammar.grammar_prefix)
    biased, _ = sample_tiny(target, draft)
    stats = [chi2_test(position_counts(biased, pos), expected[pos]) for pos in (1, 2)]  # tokens 2, 3
    assert max(s / CHI2_CRITICAL[dof] for s, dof in stats) > 3, stats


def choice_matcher(tok, backend: str = "xgrammar"):
    """A matcher of choice ["abc", "abd"] from the engine's GrammarManager with that
    grammar backend, and the ids of a, b, c, d."""
    from raylm.engine.grammar import GrammarManager
    from raylm.engine.structured_outputs import GrammarConfig

    manager = GrammarManager(lambda: tok, len(tok), [tok.eos_token_id], config=GrammarConfig(backend))
    compiled = manager.compile(StructuredOutputsParams(choice=["abc", "abd"])).result()
    manager.shutdown()
    return manager.matcher(compiled, []), [tok.convert_tokens_to_ids(c) for c in "abcd"]


def allowed_per_position(packed: bytes, vocab: int) -> list[set]:
    masks = torch.frombuffer(bytearray(packed), dtype=torch.int32).view(-1, (vocab + 31) // 32)
    return [{t for t in range(vocab) if (masks[r, t // 32] >> (t % 32)) & 1} for r in range(masks.shape[0])]


BACKENDS = pytest.mark.parametrize("backend", ["xgrammar", "guidance"])


@BACKENDS
def test_prefix_and_position_masks_leave_the_matcher_as_it_was(tok, backend):
    """grammar_prefix keeps the proposals the grammar accepts, stopping before one that
    ends it; position_bitmasks gives the mask before each proposal and after the last.
    Both grammar backends behave alike."""
    from raylm.engine.spec_decode.grammar import grammar_prefix, position_bitmasks

    m, (a, b, c, d) = choice_matcher(tok, backend)
    assert grammar_prefix(m, [a, b, a, b]) == 2  # "aba" is not a prefix of a choice
    assert grammar_prefix(m, [a, b, c, tok.eos_token_id, a]) == 3  # stops before the ending token
    assert grammar_prefix(m, [c]) == 0
    allowed = allowed_per_position(position_bitmasks([m], [[a, b]], len(tok)), len(tok))
    assert len(allowed) == 3
    assert a in allowed[0] and b not in allowed[0]
    assert b in allowed[1] and a not in allowed[1]
    assert {c, d} <= allowed[2] and a not in allowed[2]
    assert m.accept_token(a) and not m.accept_token(a)  # rolled back to the start


@BACKENDS
def test_drafted_prefix_and_masks_through_a_refused_or_ending_proposal(tok, backend):
    """Drafted proposals (rejection sampling) are kept through the first one the grammar
    refuses and through one that ends it; the masks are the matcher's state up to that
    proposal, then all-allowed (never all-blocked), and the matcher is rolled back.
    Both grammar backends behave alike."""
    from raylm.engine.spec_decode.grammar import drafted_prefix, position_bitmasks

    m, (a, b, c, d) = choice_matcher(tok, backend)
    eos, everything = tok.eos_token_id, set(range(len(tok)))
    assert drafted_prefix(m, [a, b, a, b]) == 3  # through the refused "a" (it will be rejected)
    assert drafted_prefix(m, [c, a]) == 1  # a refused first proposal is verified too
    assert drafted_prefix(m, [a, b, c, eos, a]) == 4  # through the ending token
    assert drafted_prefix(m, [a, b]) == 2 and drafted_prefix(m, []) == 0
    # Two rows at once: [a, b, a] (refused at 2) and [a, b, c, eos] (ends at 3).
    allowed = allowed_per_position(position_bitmasks([m, m], [[a, b, a], [a, b, c, eos]], len(tok)), len(tok))
    assert len(allowed) == 4 + 5
    first, second = allowed[:4], allowed[4:]
    assert a in first[0] and b not in first[0]
    assert b in first[1] and a not in first[1]
    assert {c, d} <= first[2] and a not in first[2]  # the mask the refused proposal meets: p(a) = 0
    assert first[3] == everything  # after it: never emitted
    assert second[2] == first[2] and eos not in second[2]
    assert second[3] == {eos}  # after "abc" only the end
    assert second[4] == everything  # after the end: dropped by the stop logic
    assert m.accept_token(a) and not m.accept_token(a)  # rolled back to the start
    # A matcher part-way: the masks start from its state.
    assert m.accept_token(b) and drafted_prefix(m, [d, eos]) == 2
    allowed = allowed_per_position(position_bitmasks([m], [[d, eos]], len(tok)), len(tok))
    assert d in allowed[0] and allowed[1] == {eos} and allowed[2] == everything
    assert m.accept_token(c) and m.accept_token(eos) and m.is_terminated()  # rolled back to "ab"


def test_position_bitmasks_cross_the_wire_only_when_used():
    from raylm.workers.messages import StepPlan

    assert "spec_bitmask" not in StepPlan().to_wire()
    plan = StepPlan(spec_bitmask_ids=["r1"], spec_bitmask=b"\x01\x00\x00\x00" * 3)
    back = StepPlan.from_wire(plan.to_wire())
    assert (back.spec_bitmask_ids, back.spec_bitmask) == (["r1"], plan.spec_bitmask)
