"""The Triton kernels against their PyTorch references at real shapes in bfloat16
(Qwen3-0.6B: 16 q heads / 8 kv heads; Llama-3.1-8B: 32 / 8; head_dim 128; contexts up
to 32k), plus a CUDA-graph capture of the decode step. Skipped without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU (and compiled, not interpreted, Triton)", allow_module_level=True)

from raylm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from raylm.kernels.attention.decode import (  # noqa: E402
    MAX_SPLITS, paged_decode_attention, paged_decode_attention_ref)
from raylm.kernels.attention.kv_cache import write_kv_cache, write_kv_cache_ref  # noqa: E402
from raylm.kernels.attention.prefill import (  # noqa: E402
    paged_prefill_attention, paged_prefill_attention_ref)
from raylm.kernels.norm import rms_norm, rms_norm_ref  # noqa: E402
from raylm.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402

DTYPE = torch.bfloat16
TOL = dict(atol=2e-2, rtol=2e-2)
MODELS = {"qwen3-0.6b": (16, 8), "llama-3.1-8b": (32, 8)}  # (q heads, kv heads)
HEAD_DIM = 128


def paged_inputs(seq_lens, block_size, num_kv_heads, head_dim, seed, spare_blocks=5):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen,
                           device="cuda", dtype=DTYPE)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").tolist()
    width = max(max(needed), 1)
    tables, pos = [], 0
    for n in needed:
        tables.append(perm[pos:pos + n] + [0] * (width - n))
        pos += n
    return (kv_cache, torch.tensor(tables, dtype=torch.int32, device="cuda"),
            torch.tensor(seq_lens, dtype=torch.int32, device="cuda"))


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("num_splits", [None, 1, MAX_SPLITS])
def test_decode_attention(model, block_size, num_splits):
    num_heads, num_kv_heads = MODELS[model]
    seq_lens = [1, 17, 1000, 4097, 32768, 0]  # the last row is CUDA-graph padding
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, block_size, num_kv_heads, HEAD_DIM, 0)
    q = torch.randn(len(seq_lens), num_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    scale = HEAD_DIM ** -0.5
    out = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, scale, num_splits=num_splits)
    ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, scale)
    torch.testing.assert_close(out, ref, **TOL)


def test_decode_attention_large_batch():
    num_heads, num_kv_heads = MODELS["llama-3.1-8b"]
    seq_lens = torch.randint(1, 4096, (128,)).tolist()
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, num_kv_heads, HEAD_DIM, 1)
    q = torch.randn(len(seq_lens), num_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, HEAD_DIM ** -0.5)
    ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, HEAD_DIM ** -0.5)
    torch.testing.assert_close(out, ref, **TOL)


def test_decode_attention_cuda_graph():
    """The decode launch captured once replays correctly for new lengths and queries."""
    num_heads, num_kv_heads = MODELS["qwen3-0.6b"]
    max_len, batch = 8192, 8
    kv_cache, block_tables, seq_lens_t = paged_inputs([max_len] * batch, 16, num_kv_heads, HEAD_DIM, 2)
    q = torch.randn(batch, num_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    seq_lens_t.fill_(5)
    scale = HEAD_DIM ** -0.5
    paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, scale)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, scale)
    for lens in ([1, 7, 100, 8192, 3000, 0, 16, 17], [8192] * batch):
        seq_lens_t.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, scale)
        torch.testing.assert_close(out, ref, **TOL)


def packed_queries(query_lens, num_heads, head_dim):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_heads, head_dim, device="cuda", dtype=DTYPE)
    return q, torch.tensor(starts, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_attention_mixed(model, block_size):
    num_heads, num_kv_heads = MODELS[model]
    # A fresh prompt, a chunked prefill deep into a 32k context ending in a partial block,
    # a prefix-cache hit, decode rows (one at 32k).
    query_lens = [1000, 129, 300, 1, 1, 1]
    seq_lens = [1000, 32639 + 129, 4096 + 300, 32768, 5, 1]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, block_size, num_kv_heads, HEAD_DIM, 3)
    q, query_start_loc = packed_queries(query_lens, num_heads, HEAD_DIM)
    scale = HEAD_DIM ** -0.5
    out = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale,
                                  max(query_lens))
    ref = paged_prefill_attention_ref(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_prefill_attention_head_dims(head_dim):
    query_lens, seq_lens = [517, 1, 64], [2000, 700, 64]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 4, head_dim, 4)
    q, query_start_loc = packed_queries(query_lens, 16, head_dim)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale,
                                  max(query_lens))
    ref = paged_prefill_attention_ref(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_cache(block_size):
    num_tokens, num_heads, num_kv_heads, num_blocks = 4096, 32, 8, 600
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * HEAD_DIM, device="cuda", dtype=DTYPE)
    _, k, v = qkv.split([num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM], -1)
    k, v = k.view(num_tokens, num_kv_heads, HEAD_DIM), v.view(num_tokens, num_kv_heads, HEAD_DIM)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::97] = -1
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    expected = cache.clone()
    write_kv_cache(k, v, cache, slots)
    write_kv_cache_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("hidden", [1024, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(hidden, with_residual):
    x = torch.randn(257, hidden, device="cuda", dtype=DTYPE)
    residual = torch.randn(257, hidden, device="cuda", dtype=DTYPE) if with_residual else None
    weight = (torch.rand(hidden, device="cuda") + 0.5).to(DTYPE)
    out = rms_norm(x, weight, 1e-6, residual)
    ref = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        torch.testing.assert_close(out[1], ref[1], **TOL)
        out, ref = out[0], ref[0]
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("model,theta,scaling", [
    ("qwen3-0.6b", 1000000.0, None),
    ("llama-3.1-8b", 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
])
def test_rotary_embedding(model, theta, scaling):
    from raylm.workers.layers.rotary import RotaryEmbedding

    num_heads, num_kv_heads = MODELS[model]
    num_tokens = 2048
    rope = RotaryEmbedding(HEAD_DIM, 40960, theta, scaling).cuda()
    positions = torch.randint(0, 40960, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * HEAD_DIM, device="cuda", dtype=DTYPE)
    q, k, _ = qkv.split([num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM], -1)
    q, k = q.view(num_tokens, num_heads, HEAD_DIM), k.view(num_tokens, num_kv_heads, HEAD_DIM)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache)
    rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(k, k_ref, **TOL)


def test_silu_and_mul():
    x = torch.randn(300, 2 * 14336, device="cuda", dtype=DTYPE)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL)
