"""N-gram speculative decoding of structured-output requests: a grammar request's
proposals are cut to the longest prefix its grammar accepts, every verified position
samples under the grammar's mask at that point, and the matcher advances over the
emitted tokens only. So JSON schema, regex and choice requests give token for token the
outputs of constrained decoding without speculation (greedy and seeded), with proposals
accepted, next to unconstrained speculating requests; the outputs stay valid."""
import json
import re

import jsonschema
import pytest

from raylm import LLM, SamplingParams, StructuredOutputsParams
from tests.helpers import make_checkpoint, make_tokenizer
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


def test_prefix_and_position_masks_leave_the_matcher_as_it_was(tok):
    """grammar_prefix keeps the proposals the grammar accepts, stopping before one that
    ends it; position_bitmasks gives the mask before each proposal and after the last."""
    import torch
    import xgrammar as xgr

    from raylm.engine.spec_decode.grammar import grammar_prefix, position_bitmasks
    from raylm.engine.structured_outputs import build_grammar

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
    compiled = xgr.GrammarCompiler(info).compile_grammar(
        build_grammar(StructuredOutputsParams(choice=["abc", "abd"])))
    ids = [tok.convert_tokens_to_ids(c) for c in "abcd"]
    a, b, c, d = ids
    m = xgr.GrammarMatcher(compiled)
    assert grammar_prefix(m, [a, b, a, b]) == 2  # "aba" is not a prefix of a choice
    assert grammar_prefix(m, [a, b, c, tok.eos_token_id, a]) == 3  # stops before the ending token
    assert grammar_prefix(m, [c]) == 0
    masks = torch.frombuffer(bytearray(position_bitmasks([m], [[a, b]], len(tok))), dtype=torch.int32)
    masks = masks.view(3, -1)
    allowed = [[t for t in range(len(tok)) if (masks[r, t // 32] >> (t % 32)) & 1] for r in range(3)]
    assert a in allowed[0] and b not in allowed[0]
    assert b in allowed[1] and a not in allowed[1]
    assert {c, d} <= set(allowed[2]) and a not in allowed[2]
    assert m.accept_token(a) and not m.accept_token(a)  # rolled back to the start


def test_position_bitmasks_cross_the_wire_only_when_used():
    from raylm.workers.messages import StepPlan

    assert "spec_bitmask" not in StepPlan().to_wire()
    plan = StepPlan(spec_bitmask_ids=["r1"], spec_bitmask=b"\x01\x00\x00\x00" * 3)
    back = StepPlan.from_wire(plan.to_wire())
    assert (back.spec_bitmask_ids, back.spec_bitmask) == (["r1"], plan.spec_bitmask)
