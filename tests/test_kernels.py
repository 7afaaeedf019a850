"""Every Triton kernel against its plain PyTorch reference on fresh random inputs, at
small shapes. Without a GPU the kernels run in Triton's interpreter (float32); with one
they run compiled (float32 with TF32 dots, hence the looser tolerance there)."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from raylm.kernels.gemv import gemv, gemv_ref, gemv_silu_mul, gemv_silu_mul_ref  # noqa: E402
from raylm.kernels.attention.decode import (  # noqa: E402
    decode_num_splits, paged_decode_attention, paged_decode_attention_ref)
from raylm.kernels.attention.kv_cache import (  # noqa: E402
    rotary_write_kv_cache, write_kv_cache, write_kv_cache_ref)
from raylm.kernels.attention.prefill import (  # noqa: E402
    paged_prefill_attention, paged_prefill_attention_ref)
from raylm.kernels.norm import rms_norm, rms_norm_ref  # noqa: E402
from raylm.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATTN_TOL = 1e-2 if DEVICE == "cuda" else 1e-4


def paged_inputs(seq_lens, block_size, num_kv_heads, head_dim, gen, spare_blocks=3):
    """A random KV cache and block tables handing out shuffled, non-contiguous blocks."""
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(max(needed), 1)
    tables, pos = [], 0
    for n in needed:
        tables.append(perm[pos:pos + n] + [0] * (width - n))
        pos += n
    block_tables = torch.tensor(tables, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return kv_cache.to(DEVICE), block_tables.to(DEVICE), seq_lens_t.to(DEVICE)


def test_write_kv_cache():
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 9, 2, 32, 16, 6
    # k and v as strided views of a fused qkv projection, as the model produces them.
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim, generator=gen).to(DEVICE)
    _, k, v = qkv.split([4 * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    k, v = k.view(num_tokens, num_kv_heads, head_dim), v.view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # a padding token: skipped
    slots = slots.to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    expected = cache.clone()
    write_kv_cache(k, v, cache, slots)
    write_kv_cache_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (8, 2), (6, 2)])
def test_decode_attention_split_k(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size + num_heads)
    head_dim, scale = 32, 32 ** -0.5
    # 1 token, a partial block, a context spanning all 4 splits, and a padding row.
    seq_lens = [1, block_size + 3, 150, 0]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, block_size, num_kv_heads, head_dim, gen)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(DEVICE)
    out = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, scale, num_splits=4, block_n=16)
    ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, scale)
    torch.testing.assert_close(out, ref, atol=ATTN_TOL, rtol=ATTN_TOL)
    assert torch.all(out[3] == 0)


def test_decode_attention_empty_splits_write_nothing(monkeypatch):
    """At MAX_SPLITS most splits of a short context are empty: they write no partial output and
    the merge reads none, so whatever the workspace held (NaN here) cannot reach the result."""
    import raylm.kernels.attention.decode as decode

    real_empty = torch.empty

    def nan_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(decode.torch, "empty", nan_empty)
    gen = torch.Generator().manual_seed(11)
    seq_lens = [3, 40, 0, 17]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 2, 32, gen)
    q = torch.randn(len(seq_lens), 4, 32, generator=gen).to(DEVICE)
    out = decode.paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, 0.2,
                                        num_splits=decode.MAX_SPLITS, block_n=16)
    ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, 0.2)
    torch.testing.assert_close(out, ref, atol=ATTN_TOL, rtol=ATTN_TOL)
    assert torch.all(out[2] == 0)


@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_attention_default_and_single_split(num_splits):
    gen = torch.Generator().manual_seed(7)
    seq_lens = [70, 5]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 2, 64, gen)
    q = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
    assert decode_num_splits(2, 2, DEVICE) >= 1
    out = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, 0.125, num_splits=num_splits)
    ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, 0.125)
    torch.testing.assert_close(out, ref, atol=ATTN_TOL, rtol=ATTN_TOL)


def packed_queries(query_lens, num_heads, head_dim, gen):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(DEVICE)
    return q, torch.tensor(starts, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (8, 2), (6, 2)])
def test_prefill_attention_mixed(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size * num_heads)
    head_dim, scale = 32, 32 ** -0.5
    # A fresh prompt, a chunked prefill on a cached prefix ending in a partial block, a
    # prefix-cache hit starting on a block boundary, and two decode rows.
    query_lens = [19, 13, 5, 1, 1]
    seq_lens = [19, 37 + 13, block_size + 5, 1, 41]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, block_size, num_kv_heads, head_dim, gen)
    q, query_start_loc = packed_queries(query_lens, num_heads, head_dim, gen)
    out = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale,
                                  max(query_lens), block_n=16)
    ref = paged_prefill_attention_ref(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale)
    torch.testing.assert_close(out, ref, atol=ATTN_TOL, rtol=ATTN_TOL)


@pytest.mark.parametrize("block_m,block_n,heads_first", [(16, 16, True), (64, 16, True), (128, 32, True),
                                                        (64, 64, True), (32, 16, False)])
def test_prefill_attention_tiles(block_m, block_n, heads_first, monkeypatch):
    """Tile shapes the tile sweep tries: whole unmasked tiles of a long cached prefix, then
    the masked ones at each q block's own positions; q blocks on either grid axis."""
    import raylm.kernels.attention.prefill as prefill

    if not heads_first:
        monkeypatch.setattr(prefill, "MAX_GRID_Y", 4)
    gen = torch.Generator().manual_seed(block_m + block_n)
    head_dim, scale = 32, 32 ** -0.5
    # A chunk of 70 tokens after a 97-token cached prefix, a fresh 40-token prompt, a decode row.
    query_lens, seq_lens = [70, 40, 1], [97 + 70, 40, 130]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 2, head_dim, gen)
    q, query_start_loc = packed_queries(query_lens, 8, head_dim, gen)
    out = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale,
                                  max(query_lens), block_m=block_m, block_n=block_n, num_warps=4,
                                  num_stages=3)
    ref = paged_prefill_attention_ref(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale)
    torch.testing.assert_close(out, ref, atol=ATTN_TOL, rtol=ATTN_TOL)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_prefill_attention_head_dims(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    query_lens, seq_lens = [6, 1, 3], [22, 9, 3]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 1, head_dim, gen)
    q, query_start_loc = packed_queries(query_lens, 2, head_dim, gen)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale,
                                  max(query_lens))
    ref = paged_prefill_attention_ref(q, kv_cache, block_tables, seq_lens_t, query_start_loc, scale)
    torch.testing.assert_close(out, ref, atol=ATTN_TOL, rtol=ATTN_TOL)


def test_prefill_matches_decode_on_single_tokens():
    gen = torch.Generator().manual_seed(3)
    seq_lens = [33, 2, 17]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 2, 32, gen)
    q, query_start_loc = packed_queries([1, 1, 1], 4, 32, gen)
    prefill = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, 0.2, 1)
    decode = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, 0.2, num_splits=2, block_n=16)
    torch.testing.assert_close(prefill, decode, atol=ATTN_TOL, rtol=ATTN_TOL)


def test_attention_half_precision():
    """float16 inputs, float32 accumulation (the interpreter has no bfloat16 dot)."""
    gen = torch.Generator().manual_seed(5)
    query_lens, seq_lens = [9, 1, 1], [40, 75, 3]
    kv_cache, block_tables, seq_lens_t = paged_inputs(seq_lens, 16, 2, 64, gen)
    q, query_start_loc = packed_queries(query_lens, 8, 64, gen)
    kv_cache, q = kv_cache.half(), q.half()
    out = paged_prefill_attention(q, kv_cache, block_tables, seq_lens_t, query_start_loc, 0.125, 9)
    ref = paged_prefill_attention_ref(q, kv_cache, block_tables, seq_lens_t, query_start_loc, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    q = q[query_start_loc[1:] - 1]  # each sequence's last token, as a decode step
    out = paged_decode_attention(q, kv_cache, block_tables, seq_lens_t, 0.125, num_splits=4, block_n=16)
    ref = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(with_residual):
    from raylm.workers.layers.basic import RMSNorm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=gen).to(DEVICE)
    residual = torch.randn(5, 96, generator=gen).to(DEVICE) if with_residual else None
    layer = RMSNorm(96, eps=1e-6).to(DEVICE)
    layer.weight.data = torch.rand(96, generator=gen).to(DEVICE) + 0.5
    out = rms_norm(x, layer.weight, 1e-6, residual)
    ref = rms_norm_ref(x, layer.weight, 1e-6, residual)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, layer(x, residual) if with_residual else layer(x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [None, {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64}])
def test_rotary_embedding(scaling):
    from raylm.workers.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, num_kv_heads, head_dim = 7, 4, 2, 32
    rope = RotaryEmbedding(head_dim, 512, 500000.0, scaling).to(DEVICE)
    positions = torch.randint(0, 512, (num_tokens,), generator=gen).to(DEVICE)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(DEVICE)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k = q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache)
    q_layer, k_layer = rope(positions, q.clone(), k.clone())  # in place on CUDA: on copies
    rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)  # in place, into qkv
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, q_layer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_layer, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,num_kv_heads,dtype,cache_dtype", [
    (32, 2, torch.float32, torch.float32), (80, 3, torch.float32, torch.float32),
    (32, 2, torch.bfloat16, torch.bfloat16), (32, 2, torch.bfloat16, torch.float8_e4m3fn)])
def test_rotary_write_kv_cache_is_rotary_then_write(head_dim, num_kv_heads, dtype, cache_dtype):
    """The fused launch stores exactly what the rotary kernel followed by write_kv_cache
    stores (q rotated in place, the rotated k and v at each slot, padding skipped), for
    head sizes and head counts that are not powers of two and for an fp8 cache with scales."""
    from raylm.workers.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(head_dim + num_kv_heads)
    num_tokens, num_heads, block_size, num_blocks = 9, 6, 16, 5
    rope = RotaryEmbedding(head_dim, 256, 10000.0).to(DEVICE)
    positions = torch.randint(0, 256, (num_tokens,), generator=gen).to(DEVICE)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[4] = -1  # a padding token: its q is rotated, nothing is written
    slots = slots.to(DEVICE)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, cache_dtype)
    scales = (0.5, 2.0) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)

    def views(t):
        q, k, v = t.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
                v.view(num_tokens, num_kv_heads, head_dim))

    fused_qkv, fused_cache = qkv.clone(), cache.clone()
    q, k, v = views(qkv)
    rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    write_kv_cache(k, v, cache, slots, *scales)
    fq, fk, fv = views(fused_qkv)
    rotary_write_kv_cache(positions, fq, fk, fv, rope.cos_cache, rope.sin_cache, fused_cache, slots, *scales)
    assert torch.equal(fq, q)
    assert torch.equal(fused_cache.view(torch.uint8), cache.view(torch.uint8))


@pytest.mark.parametrize("n,k,bias", [(37, 100, False), (64, 1030, True), (8, 512, False)])
def test_gemv(n, k, bias):
    """One row against a weight whose N and K are not multiples of the tiles (masked rows
    and columns), with and without a bias, and a weight with padded rows (stride > K)."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    w = torch.randn(n, k + 3, generator=gen).to(DEVICE)[:, :k]  # rows strided past K
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    out = gemv(x, w, b, block_n=8, block_k=64)
    assert out.shape == (1, n)
    torch.testing.assert_close(out, gemv_ref(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, k).to(DEVICE), w)


@pytest.mark.parametrize("n,k,block_n", [(37, 100, 1), (64, 1030, 2), (8, 512, 4)])
def test_gemv_silu_mul(n, k, block_n):
    """The gate/up GEMV with SiLU-and-mul as its epilogue: rows r and n + r of a [2n, K]
    weight, N and K not multiples of the tiles, rows strided past K."""
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    w = (torch.randn(2 * n, k + 5, generator=gen) / k ** 0.5).to(DEVICE)[:, :k]  # products of order 1
    out = gemv_silu_mul(x, w, block_n=block_n, block_k=64)
    assert out.shape == (1, n)
    torch.testing.assert_close(out, gemv_silu_mul_ref(x, w), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, silu_and_mul(torch.nn.functional.linear(x, w)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="odd"):
        gemv_silu_mul(x, w[:-1])
    with pytest.raises(ValueError, match="one row"):
        gemv_silu_mul(torch.randn(2, k).to(DEVICE), w)


def test_silu_and_mul():
    from raylm.workers.layers.basic import SiluAndMul

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 2 * 80, generator=gen).to(DEVICE)
    out = silu_and_mul(x)
    assert out.shape == (2, 3, 80)
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, SiluAndMul()(x), atol=1e-5, rtol=1e-5)


def test_linear_takes_the_gemv_only_for_one_row_on_cuda():
    """raylm.workers.layers.linear.linear: one row of x on CUDA with a bf16/fp16 weight of a
    shape where the Triton GEMV beat cuBLAS (both sides at least 4096, as measured); F.linear
    for everything else, so the CPU's results are F.linear's exactly."""
    from raylm.workers.layers.linear import gemv_wins, linear

    assert all(gemv_wins(n, k) for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                            (128256, 4096)])
    assert not gemv_wins(2048, 4096) and not gemv_wins(151936, 1024)
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 64, generator=gen), torch.randn(64, 64, generator=gen)
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:  # Hopper, as measured
        xb = torch.randn(1, 4096, generator=gen).cuda().bfloat16()
        wb = (torch.randn(4096, 4096, generator=gen) / 64).cuda().bfloat16()
        torch.testing.assert_close(linear(xb, wb), gemv_ref(xb, wb), atol=2e-2, rtol=2e-2)



def test_gate_up_silu_only_where_the_gemv_runs():
    """LlamaMLP's gate/up projection with SiLU-and-mul in one launch (gate_up_silu) where
    linear() would take the GEMV, the same values as the projection then SiluAndMul; None
    (the two-step path) elsewhere: on the CPU, for two rows, with a bias."""
    from raylm.workers.layers.basic import SiluAndMul
    from raylm.workers.layers.linear import MergedColumnParallelLinear, gate_up_silu

    gen = torch.Generator().manual_seed(9)
    layer = MergedColumnParallelLinear(64, [96, 96], dtype=torch.float32)
    layer.weight.data.copy_(torch.randn(192, 64, generator=gen) / 8)
    assert gate_up_silu(torch.randn(1, 64, generator=gen), layer) is None
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:  # Hopper, as measured
        big = MergedColumnParallelLinear(4096, [4096, 4096], dtype=torch.bfloat16).cuda()
        big.weight.data.copy_(torch.randn(8192, 4096, generator=gen) / 64)
        x = torch.randn(1, 4096, generator=gen).cuda().bfloat16()
        torch.testing.assert_close(gate_up_silu(x, big), SiluAndMul()(big(x)), atol=2e-2, rtol=2e-2)
        assert gate_up_silu(x.expand(2, -1).contiguous(), big) is None
        with_bias = MergedColumnParallelLinear(4096, [4096, 4096], bias=True, dtype=torch.bfloat16).cuda()
        assert gate_up_silu(x, with_bias) is None


def test_llama_mlp_takes_the_fused_gate_up_where_the_gemv_runs(monkeypatch):
    """LlamaMLP with the one-row GEMV forced on (as on a Hopper GPU; here the kernels run
    under the interpreter where CUDA is absent): the gate/up product and SiLU-and-mul in one
    launch (gemv_silu_mul, called once), the same output as the two-step path; two rows keep
    the two-step path."""
    from types import SimpleNamespace

    from raylm.kernels import gemv as gemv_module
    from raylm.workers.layers import linear as linear_module
    from raylm.workers.models.llama import LlamaMLP

    gen = torch.Generator().manual_seed(11)
    cfg = SimpleNamespace(hidden_size=64, intermediate_size=96, mlp_bias=False)
    mlp = LlamaMLP(cfg, torch.float32).to(DEVICE)
    for p in mlp.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) / 8)
    x = torch.randn(1, 64, generator=gen).to(DEVICE)
    want = mlp.down_proj(mlp.act(mlp.gate_up_proj(x)))
    calls = []
    fused = gemv_module.gemv_silu_mul
    monkeypatch.setattr(gemv_module, "gemv_silu_mul", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setattr(linear_module, "takes_gemv", lambda x, w: x.shape[0] == 1)
    torch.testing.assert_close(mlp(x), want, atol=1e-4, rtol=1e-4)
    assert calls == [1]
    mlp(torch.randn(2, 64, generator=gen).to(DEVICE))
    assert calls == [1]
