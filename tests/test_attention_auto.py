"""attention_backend="auto": a per-operation choice from AUTO_RULES, falling back to Triton
when a package is missing or a backend refuses the shape; tested with fake backends
registered here (they compute with the PyTorch reference and record their calls). Also a
backend's refusal error, and FlashInfer's page layout (plain PyTorch, no FlashInfer
needed). Without a GPU the Triton kernels run in Triton's interpreter."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm.workers import attention_backends  # noqa: E402
from raylm.workers.attention.flashinfer_backend import page_layout  # noqa: E402
from raylm.workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from raylm.workers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from raylm.workers.attention_backends import (AttentionShape, get_attention_backend,  # noqa: E402
                                              register_backend)
from raylm.workers.layers.attention import Attention  # noqa: E402
from tests.test_attention_backends import DEVICE, TOL, make_step  # noqa: E402


class RecordingBackend(TorchAttentionBackend):
    """The reference, recording which operations it ran; refuses decode at block_size 16."""

    name = "recording"
    calls: list = []

    def refusal(self, op, shape):
        if op == "decode" and shape.block_size == 16:
            return "no decode at block_size 16"
        return None

    def attend(self, q, kv_cache, meta, scale, k_scale=1.0, v_scale=1.0):
        self.check(meta.op, q, kv_cache)
        RecordingBackend.calls.append(meta.op)
        return super().attend(q, kv_cache, meta, scale, k_scale, v_scale)


class MissingBackend(TorchAttentionBackend):
    name = "missing"

    def __init__(self):
        raise ImportError("attention_backend 'missing' needs the missing-package package")


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setitem(attention_backends._BACKENDS, "recording", RecordingBackend)
    monkeypatch.setitem(attention_backends._BACKENDS, "missing", MissingBackend)
    monkeypatch.setattr(attention_backends, "AUTO_RULES",
                        {"decode": ("missing", "recording"), "prefill": ("recording",)})
    monkeypatch.setattr(attention_backends, "AUTO_SMALL_DECODE_SEQS", 1)
    RecordingBackend.calls = []


def _step(seqs, block_size, gen):
    num_heads, num_kv_heads, head_dim, num_blocks = 4, 2, 32, 24
    meta = make_step(seqs, block_size, num_blocks, gen)
    n = sum(new for _, new in seqs)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    return meta, (q, k, v), cache, (num_heads, head_dim, num_kv_heads, head_dim ** -0.5)


def _run(backend, meta, qkv, cache, dims):
    layer = Attention(*dims)
    layer.kv_cache = cache.clone()
    return layer(*qkv, meta, backend), layer.kv_cache


@pytest.mark.parametrize("block_size", [16, 32])
def test_auto_picks_per_op_and_falls_back_to_triton(fakes, block_size):
    gen = torch.Generator().manual_seed(block_size)
    auto = get_attention_backend("auto")
    assert [b.name for b in auto.candidates["decode"]] == ["recording"]  # "missing" skipped
    decode = _step([(20, 1), (45, 1)], block_size, gen)
    prefill = _step([(20, 1), (37, 13), (0, 9)], block_size, gen)
    for meta, qkv, cache, dims in (decode, prefill):
        got, got_cache = _run(auto, meta, qkv, cache, dims)
        want, want_cache = _run(TorchAttentionBackend(), meta, qkv, cache, dims)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        assert torch.equal(got_cache, want_cache)  # written by Triton's KV write
    # Decode at block_size 16 is refused by the rule's backend: Triton runs it.
    decode_by = "triton" if block_size == 16 else "recording"
    assert auto.for_op("decode").name == decode_by
    assert auto.for_op("prefill").name == "recording"
    assert RecordingBackend.calls == (["decode"] if decode_by == "recording" else []) + ["prefill"]
    assert isinstance(auto.fallback, TritonAttentionBackend)


def test_auto_keeps_small_decode_steps_apart(fakes):
    """Decode steps of at most AUTO_SMALL_DECODE_SEQS sequences follow "decode_small" (here
    no rule: Triton), larger ones "decode"; a CUDA graph of b rows asks for_op("decode", b)."""
    gen = torch.Generator().manual_seed(3)
    auto = get_attention_backend("auto")
    one = _step([(20, 1)], 32, gen)
    two = _step([(20, 1), (45, 1)], 32, gen)
    for meta, qkv, cache, dims in (one, two):
        got, _ = _run(auto, meta, qkv, cache, dims)
        want, _ = _run(TorchAttentionBackend(), meta, qkv, cache, dims)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert RecordingBackend.calls == ["decode"]  # the two-sequence step only
    assert auto.for_op("decode", 1).name == "triton" and auto.for_op("decode", 2).name == "recording"
    assert auto.for_op("decode").name == "recording" and auto.for_op("prefill", 1).name == "triton"


def test_auto_takes_long_prefill_steps_apart(monkeypatch):
    """A prefill step of more than AUTO_LONG_PREFILL_TOKENS new tokens with no decode row
    follows "prefill_long"; the same tokens beside a decode row, and shorter steps, follow
    "prefill" (here no rule: Triton), which CUDA graphs ask for."""
    monkeypatch.setitem(attention_backends._BACKENDS, "recording", RecordingBackend)
    monkeypatch.setattr(attention_backends, "AUTO_RULES", {"prefill_long": ("recording",)})
    monkeypatch.setattr(attention_backends, "AUTO_LONG_PREFILL_TOKENS", 20)
    RecordingBackend.calls = []
    gen = torch.Generator().manual_seed(5)
    auto = get_attention_backend("auto")
    long_ = _step([(0, 13), (37, 9)], 32, gen)     # 22 new tokens, no decode row
    mixed = _step([(0, 13), (37, 9), (20, 1)], 32, gen)  # the same beside a decode row
    short = _step([(0, 13), (37, 7)], 32, gen)     # 20 new tokens
    for meta, qkv, cache, dims in (long_, mixed, short):
        got, got_cache = _run(auto, meta, qkv, cache, dims)
        want, want_cache = _run(TorchAttentionBackend(), meta, qkv, cache, dims)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        assert torch.equal(got_cache, want_cache)
    assert RecordingBackend.calls == ["prefill"]  # the long step only
    assert auto.chosen["prefill_long"].name == "recording" and auto.chosen["prefill"].name == "triton"
    assert auto.for_op("prefill").name == "triton" and auto.for_op("prefill", 1).name == "triton"


def test_auto_rules_as_measured():
    """The shipped rules: FlashInfer decodes batches past AUTO_SMALL_DECODE_SEQS and runs long
    prompts' prefill steps when it is installed; small decode steps and other prefill steps
    (mixed steps included) stay on Triton."""
    rules = attention_backends.AUTO_RULES
    assert rules["decode"][0] == "flashinfer" and rules["decode"][-1] == "triton"
    assert rules["prefill_long"][0] == "flashinfer" and rules["prefill_long"][-1] == "triton"
    assert rules["decode_small"] == ("triton",) and rules["prefill"] == ("triton",)
    assert attention_backends.AUTO_SMALL_DECODE_SEQS >= 1
    assert attention_backends.AUTO_LONG_PREFILL_TOKENS >= 2048  # past the mixed-step graphs' sizes


def test_auto_without_rules_is_triton():
    auto = get_attention_backend("auto")
    gen = torch.Generator().manual_seed(1)
    meta, qkv, cache, dims = _step([(3, 1), (30, 1)], 16, gen)
    got, _ = _run(auto, meta, qkv, cache, dims)
    want, _ = _run(TorchAttentionBackend(), meta, qkv, cache, dims)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert auto.for_op("decode").name == "triton" and auto.for_op("prefill").name == "triton"


def test_refused_shape_is_a_clear_error(fakes):
    gen = torch.Generator().manual_seed(2)
    meta, qkv, cache, dims = _step([(20, 1), (45, 1)], 16, gen)
    with pytest.raises(ValueError, match=r"attention_backend 'recording' cannot run decode at "
                                         r"num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, "
                                         r"dtype=float32, kv_cache_dtype=float32, device=\w+: "
                                         r"no decode at block_size 16"):
        _run(RecordingBackend(), meta, qkv, cache, dims)


def test_register_backend_by_module_path():
    register_backend("triton_again", "raylm.workers.attention.triton_backend:TritonAttentionBackend")
    try:
        assert isinstance(get_attention_backend("triton_again"), TritonAttentionBackend)
    finally:
        attention_backends._BACKENDS.pop("triton_again")


def test_shape_of_reads_the_cache_layout():
    q = torch.zeros(5, 8, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 10, 32, 2, 64, dtype=torch.float8_e4m3fn)
    assert AttentionShape.of(q, cache) == AttentionShape(8, 2, 64, 32, torch.bfloat16,
                                                         torch.float8_e4m3fn, torch.device("cpu"))


def test_flashinfer_page_layout():
    tables = torch.tensor([[7, 3, 9], [4, 0, 0], [5, 6, 0]], dtype=torch.int32)
    indptr, last, indices = page_layout(tables, [33, 16, 17], block_size=16)
    assert indptr.tolist() == [0, 3, 4, 6]
    assert last.tolist() == [1, 16, 1]
    assert indices.tolist() == [7, 3, 9, 4, 5, 6]
    # A captured graph's padding rows: one token on their row's first block.
    indptr, last, indices = page_layout(tables, [5], block_size=16, rows=3)
    assert indptr.tolist() == [0, 1, 2, 3] and last.tolist() == [5, 1, 1]
    assert indices.tolist() == [7, 4, 5]
