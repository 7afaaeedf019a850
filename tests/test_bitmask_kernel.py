"""The grammar-bitmask kernel (raylm.kernels.bitmask) against its PyTorch reference, bit
for bit, and against xgrammar: its own apply_token_bitmask_inplace on the same packed
words, and the tokens a GrammarMatcher accepts. On the CPU with Triton's interpreter on,
one test at a time (other files keep the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xgrammar as xgr

from raylm.kernels import bitmask as bm
from raylm.kernels.interpret import use_interpreter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernel_path(monkeypatch):
    """The kernel on this test's device: on the CPU with Triton's interpreter on, until
    the test ends (monkeypatch restores TRITON_INTERPRET, and with it the reference)."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        use_interpreter()
    assert bm.runs_kernel(DEVICE)


def random_bitmask(k: int, words: int, seed: int) -> torch.Tensor:
    """int32 [k, words] of random bits, with the awkward words mixed in: all ones (-1),
    only the sign bit, zero; and row 1 (where there is one) all zero."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(-2 ** 31, 2 ** 31, (k, words), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([-1, -2 ** 31, 0, 2 ** 31 - 1, 1], dtype=torch.int32)
    pick = torch.randint(0, 8, (k, words), generator=g)
    out = torch.where(pick < len(special), special[pick.clamp_max(len(special) - 1)], out)
    if k > 1:
        out[1] = 0
    return out


def banned_by_bits(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [k, vocab]: the tokens each row bans, from the bytes (numpy's little-endian
    bit order: bit j of a row is bit j % 32 of word j // 32 on a little-endian host)."""
    unpacked = np.unpackbits(bits.cpu().contiguous().numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.zeros(bits.shape[0], vocab, dtype=torch.bool)
    n = min(vocab, unpacked.shape[1])
    allowed[:, :n] = torch.from_numpy(unpacked[:, :n].astype(bool))
    return ~allowed


def check(batch: int, vocab: int, words: int, rows, dtype=torch.float32, pad: int = 0, seed: int = 0,
          rows_as_tensor: bool = False):
    """Kernel vs reference on logits [batch, vocab] (a slice of [batch, vocab + pad] when
    pad: row stride vocab + pad), bitmask [len(rows), words]."""
    g = torch.Generator().manual_seed(seed + 1)
    full = torch.randn(batch, vocab + pad, generator=g).to(dtype).to(DEVICE)
    want = full.clone()
    bits = random_bitmask(len(rows), words, seed).to(DEVICE)
    r = torch.tensor(rows, dtype=torch.int64, device=DEVICE) if rows_as_tensor else list(rows)
    bm.apply_token_bitmask(full[:, :vocab], r, bits)
    bm.apply_token_bitmask_ref(want[:, :vocab], list(rows), bits)
    assert torch.equal(full, want)  # the padding columns untouched too
    # The banned tokens, independently of both: -inf exactly where the bits say.
    expect = torch.zeros(batch, vocab + pad, dtype=torch.bool)
    if len(rows):
        expect[list(rows), :vocab] = banned_by_bits(bits, vocab)
    assert torch.equal(full.cpu() == float("-inf"), expect)
    return full


def test_kernel_equals_the_reference(kernel_path):
    check(6, 1000, 32, [4, 0, 5, 2], seed=1)  # bitmask exactly covering: 1000 -> 32 words
    check(6, 1000, 32, [4, 0, 5, 2], dtype=torch.bfloat16, seed=2, rows_as_tensor=True)
    check(3, 4096, 128, [0, 1, 2], seed=3)  # V a multiple of 32
    check(2, 1, 1, [1], seed=4)  # one token


def test_bitmask_narrower_or_wider_than_the_vocab(kernel_path):
    logits = check(4, 1000, 20, [3, 1], seed=5)  # 640 tokens: the rest banned
    assert (logits[[3, 1], 640:] == float("-inf")).all()
    assert torch.isfinite(logits[[0, 2]]).all()
    check(4, 1000, 40, [3, 1], dtype=torch.bfloat16, seed=6)  # 1280 bits: past 1000 ignored
    check(4, 70, 1, [2, 0, 3], seed=7)  # one word for 70 tokens


def test_strided_logits_and_rows_out_of_order(kernel_path):
    check(8, 999, 32, [7, 2, 5, 0, 3], pad=37, seed=8)  # row stride 1036
    check(8, 999, 32, [6, 1], dtype=torch.bfloat16, pad=1, seed=9, rows_as_tensor=True)
    check(5, 33000, 1032, [4, 0, 2], pad=5, seed=10)  # past one interpreter program


def test_all_ones_and_all_zero_rows(kernel_path):
    logits = torch.randn(3, 100, device=DEVICE)
    before = logits.clone()
    bits = torch.tensor([[-1] * 4, [0] * 4], dtype=torch.int32, device=DEVICE)
    bm.apply_token_bitmask(logits, [2, 0], bits)
    assert torch.equal(logits[[1, 2]], before[[1, 2]])
    assert (logits[0] == float("-inf")).all()
    # Only bit 31 of each word: tokens 31, 63, 95 kept.
    bits = torch.full((1, 4), -2 ** 31, dtype=torch.int32, device=DEVICE)
    bm.apply_token_bitmask(logits, [1], bits)
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [31, 63, 95]


def test_no_rows(kernel_path):
    logits = torch.randn(3, 100, device=DEVICE)
    before = logits.clone()
    empty = torch.zeros(0, 4, dtype=torch.int32, device=DEVICE)
    bm.apply_token_bitmask(logits, [], empty)
    bm.apply_token_bitmask(logits, torch.zeros(0, dtype=torch.int64, device=DEVICE), empty)
    bm.apply_token_bitmask_ref(logits, [], empty)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="shape"):
        bm.apply_token_bitmask(logits, [0, 1], empty)


def test_the_reference_without_the_kernel(monkeypatch):
    """Outside the interpreter on the CPU the public function is the reference (an
    earlier test may have turned the interpreter on for the whole run: off here)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not bm.runs_kernel("cpu")
    logits = torch.randn(3, 100)
    want = logits.clone()
    bits = random_bitmask(2, 3, 11)
    bm.apply_token_bitmask(logits, [2, 0], bits)
    bm.apply_token_bitmask_ref(want, [2, 0], bits)
    assert torch.equal(logits, want)
    assert torch.equal(logits == float("-inf"), torch.cat(
        [banned_by_bits(bits[1:], 100), torch.zeros(1, 100, dtype=torch.bool), banned_by_bits(bits[:1], 100)]))


def test_bit_order_is_xgrammars(kernel_path):
    batch, vocab = 5, 1000
    bits = xgr.allocate_token_bitmask(batch, vocab)  # [5, 32], all ones
    bits.copy_(random_bitmask(batch, bits.shape[1], 12))
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(13))
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bits)  # xgrammar's CPU implementation
    out = logits.to(DEVICE)
    bm.apply_token_bitmask(out, list(range(batch)), bits.to(DEVICE))
    assert torch.equal(out.cpu(), want)
    # A subset of rows: xgrammar's indices pick rows of a full-batch bitmask.
    rows = [3, 0]
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bits, indices=rows)
    out = logits.to(DEVICE)
    bm.apply_token_bitmask(out, rows, bits[rows].to(DEVICE))
    assert torch.equal(out.cpu(), want)


def test_a_matchers_bitmask_allows_what_it_accepts(kernel_path):
    vocab = ["a", "b", "c", "{", "}", '"', ":", ",", " ", "1", "2", "ab", "bc", '{"', '"a"', "</s>"]
    vocab += [f"x{i}" for i in range(60)] + ["a" * 3, "12", '":', '"}']
    tokenizer = xgr.TokenizerInfo(vocab, stop_token_ids=[15])  # 80 tokens
    compiler = xgr.GrammarCompiler(tokenizer)
    regex = xgr.GrammarMatcher(compiler.compile_regex(r"a(b|c)*\{[12]+\}"))
    json = xgr.GrammarMatcher(compiler.compile_json_schema(
        '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}',
        any_whitespace=False))
    for t in [11, 12]:  # "ab", "bc"
        assert regex.accept_token(t)
    assert json.accept_token(13)  # '{"'
    model_vocab = 100  # the model's vocabulary padded past the tokenizer's: 96 bits cover 96
    bits = xgr.allocate_token_bitmask(2, tokenizer.vocab_size)
    matchers = [json, regex]
    for i, m in enumerate(matchers):
        m.fill_next_token_bitmask(bits, i)
    logits = torch.zeros(3, model_vocab, device=DEVICE)
    bm.apply_token_bitmask(logits, [2, 0], bits.to(DEVICE))  # json -> row 2, regex -> row 0
    assert torch.isfinite(logits[1]).all()
    for row, m in zip([2, 0], matchers):
        accepted = []
        for t in range(tokenizer.vocab_size):
            if m.accept_token(t):
                accepted.append(t)
                m.rollback(1)
        assert accepted
        assert torch.isfinite(logits[row]).nonzero().flatten().tolist() == accepted
