"""logit_bias, allowed_token_ids and bad_words through `LLM.generate` on a random tiny
llama (transformers' greedy tokens are the oracle for the unbiased run), plus the wire
form of the options and of the step plan's grammar bitmask."""
from __future__ import annotations

import msgpack
import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.engine.input_processor import bad_words_token_ids
from raylm.workers.logits_processors import apply_bitmask, apply_processors
from raylm.workers.messages import SamplingOptions, SeqChunk, StepPlan
from tests.helpers import hf_greedy

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(llama_dir):
    engine = LLM(llama_dir, max_model_len=256, max_num_seqs=8)
    yield engine
    engine.shutdown()


def greedy(llm, n=8, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_moves_greedy_tokens(llm, llama_dir):
    base = greedy(llm)
    ids = llm.get_tokenizer().encode(PROMPT)
    assert base == hf_greedy(llama_dir, ids, 8)[0]
    first = base[0]
    banned = greedy(llm, logit_bias={first: -100})
    assert banned[0] != first
    forced_token = next(t for t in range(10, 300) if t not in base)
    assert greedy(llm, logit_bias={str(forced_token): 100}) == [forced_token] * 8  # JSON's str key
    assert greedy(llm, logit_bias={forced_token: 0.0}) == base


def test_allowed_token_ids_restrict_sampling(llm):
    allowed = [11, 42, 97]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, allowed_token_ids=allowed)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1


def test_bad_words_never_appear(llm):
    tok = llm.get_tokenizer()
    base = greedy(llm, n=16)
    # Words the greedy run spells (random weights: mostly odd bytes, some plain words).
    words = list(dict.fromkeys(w for w in (tok.decode([t]).strip() for t in base)
                               if w.isascii() and w.isalpha()))[:2]
    assert words, tok.decode(base)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, bad_words=words),
                       use_tqdm=False)[0].outputs[0]
    for ids in bad_words_token_ids(tok, words):
        for i in range(len(out.token_ids) - len(ids) + 1):
            assert out.token_ids[i:i + len(ids)] != ids, (words, ids, out.token_ids)
    assert out.token_ids != base


def test_neighbours_are_unchanged_and_async_agrees(llm, llama_dir):
    plain = SamplingParams(temperature=0.7, seed=5, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=5, max_tokens=12, ignore_eos=True, logit_bias={7: 50}),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, allowed_token_ids=[20, 21]),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, bad_words=["the", "fox"])]
    outs = llm.generate([PROMPT] * 4, [plain] + others, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    other = LLM(llama_dir, max_model_len=256, max_num_seqs=8, async_scheduling=True)
    try:
        again = other.generate([PROMPT] * 4, [plain] + others, use_tqdm=False)
    finally:
        other.shutdown()
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kw, message", [
    (dict(logit_bias={999999: 1.0}), "logit_bias key 999999 is out of the vocabulary (size "),
    (dict(allowed_token_ids=[3, 50000]), "allowed_token_ids entry 50000 is out of the vocabulary (size "),
])
def test_out_of_vocab_ids_raise(llm, kw, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        llm.generate([PROMPT], SamplingParams(**kw), use_tqdm=False)


def test_processors_against_a_reference():
    """The batched ops against a per-row loop on fresh random logits."""
    torch.manual_seed(0)
    logits = torch.randn(4, 70)
    opts = [SamplingOptions(logit_bias=[(3, 2.0), (69, -5.0)]),
            SamplingOptions(allowed_token_ids=[1, 5, 68]),
            SamplingOptions(bad_words_token_ids=[[9], [4, 7, 8], [2, 6]])]
    outputs = [[], [], [1, 4, 7]]
    got = logits.clone()
    apply_processors(got, [0, 2, 3], opts, outputs)
    want = logits.clone()
    want[0, 3] += 2.0
    want[0, 69] -= 5.0
    keep = torch.full((70,), float("-inf"))
    keep[[1, 5, 68]] = 0
    want[2] += keep
    want[3, [9, 8]] = float("-inf")  # [2, 6]: the outputs do not end with 2
    assert torch.equal(got, want)

    bits = torch.randint(0, 2, (2, 70), dtype=torch.bool)
    words = torch.zeros(2, 3, dtype=torch.int64)
    for j in range(70):
        words[:, j // 32] |= bits[:, j].long() << (j % 32)
    packed = words.to(torch.int32)  # two's complement: bit 31 is the sign
    got = logits.clone()
    apply_bitmask(got, [1, 3], packed)
    want = logits.clone()
    want[[1, 3]] = want[[1, 3]].masked_fill(~bits, float("-inf"))
    assert torch.equal(got, want)


def test_wire_round_trips():
    o = SamplingOptions(logit_bias=[(3, 2.0)], allowed_token_ids=[1], bad_words_token_ids=[[4, 5]])
    assert SamplingOptions.from_wire(msgpack.unpackb(msgpack.packb(o.to_wire()))) == \
        SamplingOptions(logit_bias=[[3, 2.0]], allowed_token_ids=[1], bad_words_token_ids=[[4, 5]])
    plan = StepPlan(seqs=[SeqChunk("a", [1], 0, [0], True)], bitmask_ids=["a"], bitmask=b"\x01\x00\x00\x80")
    back = StepPlan.from_wire(msgpack.unpackb(msgpack.packb(plan.to_wire())))
    assert (back.bitmask_ids, back.bitmask) == (["a"], plan.bitmask)
    assert "bitmask" not in StepPlan(seqs=plan.seqs).to_wire()  # no grammar: nothing on the wire
