"""Quantization kernels against their PyTorch references at tiny shapes: the w4a16 GEMM
(GPTQ 4/8-bit sym/asym, group sizes 32 and -1, act-order g_idx; AWQ 4-bit) on weights
packed here by an independent packer, the packing orders on hand-written words, the
int8 activation conventions on edge cases, fp8 quantization and the W8A8 GEMMs. Without
a GPU the Triton kernels run in the interpreter (float32)."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm.kernels.quant.act import (  # noqa: E402
    per_token_quant_fp8, per_token_quant_fp8_ref, per_token_quant_int8,
    per_token_quant_int8_ref)
from raylm.kernels.quant import (  # noqa: E402
    block_scales_for_cublas, dequantize_awq, dequantize_gptq, fp8_block_gemm, fp8_block_gemm_ref,
    fp8_block_scaled_mm, fp8_gemm, fp8_gemm_ref, unpack_awq, unpack_gptq,
    FP8_TRITON_MAX_M, W4R_SLOT, I8Config, W4Config, dequantize_w4r, pick_config, pick_w4r_config, repack_w4,
    w4a16_gemm, w4a16_gemm_ref, w4r_gemm, w8a8_int8_gemm, w8a8_int8_gemm_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=2e-2, rtol=2e-2) if DEVICE == "cuda" else dict(atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- a packer for the tests

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_along_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] -> [K // pack, N]; row pack*i + j into word i at bits j*bits."""
    pack = 32 // bits
    words = torch.zeros(q.shape[0] // pack, q.shape[1], dtype=torch.int64)
    for j in range(pack):
        words |= q[j::pack].long() << (j * bits)
    return _to_int32(words)


def pack_along_cols(q: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """[R, C] -> [R, C // pack]; slot i of word c holds column pack*c + order[i]."""
    pack = 32 // bits
    order = order or list(range(pack))
    words = torch.zeros(q.shape[0], q.shape[1] // pack, dtype=torch.int64)
    for i in range(pack):
        words |= q[:, order[i]::pack].long() << (i * bits)
    return _to_int32(words)


AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map when packing


def pack_layout(layout: str, q: torch.Tensor, z: torch.Tensor, bits: int):
    """(qweight, qzeros) of integer weight q and zeros z, packed as `layout` stores them."""
    if layout == "gptq":
        return pack_along_rows(q, bits), pack_along_cols(z, bits)
    return pack_along_cols(q, 4, AWQ_PACK_ORDER), pack_along_cols(z, 4, AWQ_PACK_ORDER)


def random_quantized(k, n, bits, group_size, act_order, sym, gen):
    """Integer weight, zeros, scales and g_idx, plus the float weight they stand for."""
    num_groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 2 ** bits, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        z = torch.full((num_groups, n), 2 ** (bits - 1), dtype=torch.int32)
    else:
        z = torch.randint(0, 2 ** bits, (num_groups, n), generator=gen, dtype=torch.int32)
    s = torch.rand(num_groups, n, generator=gen) * 0.02 + 0.001
    gs = k if group_size == -1 else group_size
    g_idx = (torch.randperm(k, generator=gen) // gs if act_order else torch.arange(k) // gs).int()
    w = (q - z[g_idx.long()]).float() * s[g_idx.long()]
    return q, z, s, g_idx, w


# ---------------------------------------------------------------- packing orders

def test_unpack_gptq_known_words():
    word = 0x76543210  # slot j holds j
    q, z = unpack_gptq(torch.tensor([[word, 0]], dtype=torch.int32),
                       torch.tensor([[word]], dtype=torch.int32))
    assert q[:, 0].tolist() == list(range(8)) and q[:, 1].tolist() == [0] * 8
    assert z.tolist() == [list(range(8))]
    q8, _ = unpack_gptq(torch.tensor([[0x7F02FF01]], dtype=torch.int32), None, bits=8)
    assert q8[:, 0].tolist() == [0x01, 0xFF, 0x02, 0x7F]


def test_unpack_awq_known_word():
    word = torch.tensor([[0x76543210]], dtype=torch.int32)  # slot i holds i
    q, z = unpack_awq(word, word)
    # slot i holds column AWQ_ORDER[i], so column j reads slot AWQ_REVERSE_ORDER[j]
    assert q.tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]] and z.tolist() == q.tolist()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_pack_unpack_roundtrip(bits):
    gen = torch.Generator().manual_seed(bits)
    q, z, s, g_idx, w = random_quantized(64, 32, bits, 16, True, False, gen)
    qweight, qzeros = pack_along_rows(q, bits), pack_along_cols(z, bits)
    q2, z2 = unpack_gptq(qweight, qzeros, bits)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    # GPTQ v1 stores zero - 1 (masked to the bit width), undone by zero_offset=1.
    stored = pack_along_cols((z - 1) & (2 ** bits - 1), bits)
    w2 = dequantize_gptq(qweight, s, stored, g_idx, 16, bits, zero_offset=1)
    ok = (z > 0)[g_idx.long()]  # stored zero -1 wraps to the max, as in vLLM
    assert torch.equal(w2[ok], w[ok])
    assert torch.equal(dequantize_gptq(qweight, s, qzeros, g_idx, 16, bits), w)


def test_awq_pack_unpack_roundtrip():
    gen = torch.Generator().manual_seed(1)
    q, z, s, _, w = random_quantized(64, 32, 4, 32, False, False, gen)
    qweight, qzeros = pack_along_cols(q, 4, AWQ_PACK_ORDER), pack_along_cols(z, 4, AWQ_PACK_ORDER)
    q2, z2 = unpack_awq(qweight, qzeros)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    assert torch.equal(dequantize_awq(qweight, s, qzeros, 32), w)


# ---------------------------------------------------------------- w4a16 GEMM

GPTQ_CASES = [  # (bits, group_size, act_order, sym)
    (4, 32, False, True), (4, 32, False, False), (4, 32, True, False), (4, 32, True, True),
    (4, 16, False, False), (4, -1, False, False), (8, 32, True, False), (8, -1, False, True),
]


@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("bits,group_size,act_order,sym", GPTQ_CASES)
def test_w4a16_gptq(m, bits, group_size, act_order, sym):
    gen = torch.Generator().manual_seed(m * 100 + bits * 10 + group_size % 7 + act_order)
    # Masked tails: n is not a multiple of the interpreter's BLOCK_N, nor k (-1) of BLOCK_K.
    # Group 16 < BLOCK_K takes the kernel's per-row group lookup, as act-order does.
    k, n = (136 if group_size == -1 else 128), 72
    q, z, s, g_idx, w = random_quantized(k, n, bits, group_size, act_order, sym, gen)
    qweight, qzeros = pack_along_rows(q, bits), pack_along_cols(z - 1 if sym else z, bits)
    zero_offset = 1 if sym else 0  # sym as a GPTQ v1 checkpoint: stored zero - 1
    x = torch.randn(m, k, generator=gen)
    args = [t.to(DEVICE) for t in (qweight, s.to(DTYPE), qzeros)]
    g = g_idx.to(DEVICE) if act_order else None
    out = w4a16_gemm(x.to(DEVICE, DTYPE), *args, g, group_size, "gptq", bits, zero_offset)
    ref = w4a16_gemm_ref(x.to(DEVICE, DTYPE), *args, g, group_size, "gptq", bits, zero_offset)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(ref.float().cpu(), x.to(DTYPE).float() @ w.to(DTYPE).float(), **TOL)


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("group_size", [32, -1])
def test_w4a16_awq(m, group_size):
    gen = torch.Generator().manual_seed(m + group_size)
    k, n = 96, 64
    q, z, s, _, w = random_quantized(k, n, 4, group_size, False, False, gen)
    qweight, qzeros = pack_along_cols(q, 4, AWQ_PACK_ORDER), pack_along_cols(z, 4, AWQ_PACK_ORDER)
    x = torch.randn(2, m, k, generator=gen)  # leading dims are flattened
    bias = torch.randn(n, generator=gen)
    args = [t.to(DEVICE) for t in (qweight, s.to(DTYPE), qzeros)]
    xd, bd = x.to(DEVICE, DTYPE), bias.to(DEVICE, DTYPE)
    out = w4a16_gemm(xd, *args, None, group_size, "awq", bias=bd)
    ref = w4a16_gemm_ref(xd, *args, None, group_size, "awq", bias=bd)
    assert out.shape == (2, m, n)
    torch.testing.assert_close(out, ref, **TOL)
    expected = x.to(DTYPE).float() @ w.to(DTYPE).float() + bias.to(DTYPE).float()
    torch.testing.assert_close(ref.float().cpu(), expected, **TOL)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("layout,bits,group_size,act_order", [
    ("gptq", 4, 32, False), ("gptq", 8, 32, False), ("gptq", 4, 16, True), ("awq", 4, 32, False)])
def test_w4a16_launch_variants(layout, bits, group_size, act_order, expand, split_k):
    # The decode configurations: K split across programs (partial sums added in a second
    # kernel, bias there too), packed words unpacked in registers. N = 72 leaves a partial
    # last N tile; K = 144 (group 16) a partial last K tile; 3 splits of 5 K tiles leave
    # the last split shorter.
    gen = torch.Generator().manual_seed(bits * 10 + group_size + expand + split_k)
    k, n = (144 if group_size == 16 else 160), 72
    q, z, s, g_idx, w = random_quantized(k, n, bits, group_size, act_order, False, gen)
    qweight, qzeros = pack_layout(layout, q, z, bits)
    x = torch.randn(5, k, generator=gen).to(DEVICE, DTYPE)
    bias = torch.randn(n, generator=gen).to(DEVICE, DTYPE)
    args = [t.to(DEVICE) for t in (qweight, s.to(DTYPE), qzeros)]
    g = g_idx.to(DEVICE) if act_order else None
    cfg = W4Config(16, 32, 32, split_k, expand, 1, 1)
    out = w4a16_gemm(x, *args, g, group_size, layout, bits, bias=bias, config=cfg)
    ref = w4a16_gemm_ref(x, *args, g, group_size, layout, bits, bias=bias)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("layout,bits,group_size,act_order", [
    ("gptq", 4, 32, True), ("gptq", 8, -1, False), ("awq", 4, 32, False)])
def test_w4a16_dequantize_then_matmul(layout, bits, group_size, act_order):
    # From dequant_min_m rows the whole weight is dequantized (AWQ's words unpacked in
    # registers), then multiplied densely.
    gen = torch.Generator().manual_seed(bits + group_size)
    k, n = 128, 72
    q, z, s, g_idx, w = random_quantized(k, n, bits, group_size, act_order, False, gen)
    qweight, qzeros = pack_layout(layout, q, z, bits)
    x = torch.randn(6, k, generator=gen).to(DEVICE, DTYPE)
    args = [t.to(DEVICE) for t in (qweight, s.to(DTYPE), qzeros)]
    g = g_idx.to(DEVICE) if act_order else None
    out = w4a16_gemm(x, *args, g, group_size, layout, bits, dequant_min_m=4)
    torch.testing.assert_close(out, w4a16_gemm_ref(x, *args, g, group_size, layout, bits), **TOL)


def test_w4a16_pick_config(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choice, made on CPU
    from raylm.kernels import quant as quant_gemm

    for layout in ("gptq", "awq"):
        for m in (1, 7, 16, 40, 200):
            for k, n in [(4096, 4096), (4096, 28672), (14336, 4096), (64, 64)]:
                cfg = pick_config(m, k, n, layout)
                assert 16 <= cfg.block_m <= quant_gemm.MAX_BLOCK_M and cfg.block_m >= min(m, 64)
                tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
                assert 1 <= cfg.split_k <= -(-k // cfg.block_k)
                assert cfg.split_k == 1 or tiles * cfg.split_k <= quant_gemm.TARGET_PROGRAMS
    # small groups: one group per K tile; scattered groups: narrow tiles, a shallow pipeline
    assert pick_config(1, 4096, 4096, "gptq", group_size=32).block_k == 32
    scattered = pick_config(1, 4096, 4096, "gptq", has_g_idx=True)
    assert scattered.num_stages <= 2 and scattered.block_n <= 64
    assert pick_config(20, 4096, 4096, "gptq", group_size=96).num_stages <= 2
    with pytest.raises(ValueError, match="config.block_k is 24"):
        w4a16_gemm(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.int32), torch.ones(2, 32),
                   None, None, 32, "gptq", config=W4Config(16, 32, 24, 1, False, 1, 1))


def test_w4a16_fp16():
    # fp16 activations: the dequantized tile is rounded to fp16 before the dot.
    gen = torch.Generator().manual_seed(4)
    q, z, s, g_idx, w = random_quantized(128, 64, 4, 32, True, False, gen)
    args = (pack_along_rows(q, 4).to(DEVICE), s.half().to(DEVICE), pack_along_cols(z, 4).to(DEVICE),
            g_idx.to(DEVICE), 32, "gptq")
    x = torch.randn(20, 128, generator=gen).half().to(DEVICE)
    out, ref = w4a16_gemm(x, *args), w4a16_gemm_ref(x, *args)
    assert out.dtype == torch.float16
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


def test_w4a16_symmetric_without_qzeros():
    gen = torch.Generator().manual_seed(5)
    q, _, s, _, w = random_quantized(64, 32, 4, 32, False, True, gen)
    x = torch.randn(4, 64, generator=gen).to(DEVICE, DTYPE)
    qweight, sd = pack_along_rows(q, 4).to(DEVICE), s.to(DEVICE, DTYPE)
    out = w4a16_gemm(x, qweight, sd, None, None, 32, "gptq")
    torch.testing.assert_close(out, w4a16_gemm_ref(x, qweight, sd, None, None, 32, "gptq"), **TOL)


def test_w4a16_rejects_bad_shapes():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="qweight has shape"):
        w4a16_gemm(x, torch.zeros(4, 32, dtype=torch.int32), torch.ones(2, 32), None, None, 32, "gptq")
    with pytest.raises(ValueError, match="layout is 'exl2'"):
        w4a16_gemm(x, torch.zeros(8, 32, dtype=torch.int32), torch.ones(2, 32), None, None, 32, "exl2")
    with pytest.raises(ValueError, match="bits is 8; awq"):
        w4a16_gemm(x, torch.zeros(64, 8, dtype=torch.int32), torch.ones(2, 32), None, None, 32, "awq", 8)


# ---------------------------------------------------------------- w4r: the GPU's repacked 4-bit layout

W4R_DTYPES = [DTYPE, torch.bfloat16] if DEVICE == "cuda" else [DTYPE]


def test_w4r_slot_order_matches_the_kernels_pairs():
    # (word >> 4 i) & 0x000F000F holds slots i and i + 4; the kernel's joins put the pair's
    # high lane (slot i + 4) first, pairs i = d1 + 2 d2 at positions 4 d1 + 2 d2: W4R_SLOT.
    slots = [None] * 8
    for d1 in range(2):
        for d2 in range(2):
            for e in range(2):
                slots[4 * d1 + 2 * d2 + e] = d1 + 2 * d2 + 4 * (1 - e)
    assert slots == W4R_SLOT
    q = torch.arange(8, dtype=torch.int32).reshape(8, 1) * 2 % 16  # row r holds 2 r
    qweight, _, _ = repack_w4(q, None, torch.ones(1, 1), torch.float32)
    word = int(qweight[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * W4R_SLOT[p])) & 15 for p in range(8)] == [2 * p for p in range(8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,group_size,sym", [("gptq", 32, False), ("gptq", -1, True), ("awq", 32, False)])
def test_w4r_repack_keeps_the_function(layout, group_size, sym, dtype):
    # The repacked layout dequantizes to the original format's weights (exactly in float32;
    # in 16 bits the scales are rounded once to the activation dtype).
    gen = torch.Generator().manual_seed(group_size % 7 + sym)
    q, z, s, _, w = random_quantized(128, 64, 4, group_size, False, sym, gen)
    offset = 1 if layout == "gptq" else 0  # as a GPTQ v1 checkpoint: stored zero - 1
    z = z.clamp(min=offset)
    qweight, qzeros = pack_layout(layout, q, z - offset, 4)
    unpack = unpack_gptq if layout == "gptq" else unpack_awq
    uq, uz = unpack(qweight, qzeros, 4)
    rq, rs, zb = repack_w4(uq, None if sym else uz, s, dtype, zero_offset=offset)
    assert rq.dtype == torch.int32 and rq.shape == (16, 64) and rs.dtype == zb.dtype == dtype
    expected = (q - z[torch.arange(128) // (128 if group_size == -1 else group_size)]).float() \
        * s.to(dtype).float()[torch.arange(128) // (128 if group_size == -1 else group_size)]
    torch.testing.assert_close(dequantize_w4r(rq, rs, zb, group_size), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", W4R_DTYPES)
@pytest.mark.parametrize("m,group_size,split_k,dequant", [
    (3, 32, 1, False), (40, 32, 3, False), (5, -1, 2, False), (17, 64, 1, False), (6, 32, 1, True), (9, -1, 1, True)])
def test_w4r_gemm(m, group_size, split_k, dequant, dtype):
    # Fused (K split or not) and dequantize-then-matmul, bias or none, against the
    # float32 product of the dequantized weight. N = 72 leaves a partial N tile, K = 136
    # (one group) a partial K tile.
    gen = torch.Generator().manual_seed(m + split_k + dequant)
    k, n = (136 if group_size == -1 else 128), 72
    q, z, s, _, w = random_quantized(k, n, 4, group_size, False, False, gen)
    qweight, scales, zb = (t.to(DEVICE) for t in repack_w4(q, z, s, dtype))
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if m % 2 else None
    cfg = None if dequant else W4Config(16, 32 if DEVICE == "cpu" else 64, 32, split_k, False,
                                        4 if DEVICE == "cuda" else 1, 1)
    out = w4r_gemm(x, qweight, scales, zb, group_size, bias=bias, dequant_min_m=1 if dequant else None, config=cfg)
    ref = x.float() @ dequantize_w4r(qweight, scales, zb, group_size)
    if bias is not None:
        ref = ref + bias.float()
    assert out.dtype == dtype and out.shape == (m, n)
    tol = TOL if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_w4r_gemm_checks():
    q = torch.zeros(64, 32, dtype=torch.int32)
    qweight, s, zb = (t.to(DEVICE) for t in repack_w4(q, None, torch.ones(2, 32), DTYPE))
    x = torch.randn(2, 64).to(DEVICE, DTYPE)
    with pytest.raises(ValueError, match="scales has 2 groups; K=64 and group_size=16 give 4"):
        w4r_gemm(x, qweight, s, zb, 16)
    with pytest.raises(ValueError, match=f"dtypes {DTYPE}, {DTYPE}, torch.bfloat16"):
        w4r_gemm(x, qweight, s, zb.bfloat16(), 32)
    with pytest.raises(ValueError, match="qweight has shape"):
        w4r_gemm(x, qweight[:4], s, zb, 32)
    with pytest.raises(ValueError, match="K is 60; the w4r layout packs 8 rows"):
        repack_w4(torch.zeros(60, 32, dtype=torch.int32), None, torch.ones(1, 32), torch.float32)
    with pytest.raises(ValueError, match="config.block_k 64 does not divide group_size 32"):
        w4r_gemm(x, qweight, s, zb, 32, config=W4Config(16, 32, 64, 1, False, 1, 1))


def test_w4r_pick_config(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choice, made on CPU
    from raylm.kernels import quant as quant_gemm

    for m in (1, 16, 33, 100, 255):
        for k, n in [(4096, 6144), (4096, 28672), (14336, 4096)]:
            cfg = pick_w4r_config(m, k, n, 128)
            assert 128 % cfg.block_k == 0 and cfg.block_m >= min(m, 256)
            tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
            target = quant_gemm.W4R_SPLIT_TARGET.get(cfg.block_m, quant_gemm.TARGET_PROGRAMS)
            assert cfg.split_k == 1 or tiles * cfg.split_k <= target
    assert pick_w4r_config(1, 4096, 4096, 32).block_k == 32


# ---------------------------------------------------------------- activation quantization

@pytest.mark.parametrize("dtype", [DTYPE, torch.bfloat16])
@pytest.mark.parametrize("convention", ["vllm", "compressed-tensors"])
def test_per_token_quant_int8_random(convention, dtype):
    gen = torch.Generator().manual_seed(0)
    # bf16's coarse values make exact .5 products common: rounding must match exactly
    x = (torch.randn(32, 200, generator=gen) * torch.logspace(-3, 2, 32).view(-1, 1)).to(DEVICE, dtype)
    q, scale = per_token_quant_int8(x, convention)
    q_ref, scale_ref = per_token_quant_int8_ref(x, convention)
    assert q.dtype == torch.int8 and scale.shape == (32, 1)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert ((q.float() * scale - x.float()).abs() <= scale * 0.501).all()  # half a step


def test_per_token_quant_int8_edge_cases():
    rows = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],          # all zeros
        [127.0, 2.5, 3.5, -2.5, 0.5, -127.0],   # vllm: 127 / amax == 1, exact .5 ties
        [127.5, 2.5, 3.5, -2.5, 1.5, -127.5],   # compressed-tensors: scale == 1, ties
        [1.1875, 0.59375, 0.0, 0.0, 0.0, 0.0],  # 0.59375 * fl(127 / 1.1875) = 63.499996
    ])
    x = rows.to(DEVICE)
    q, s = per_token_quant_int8(x, "vllm")
    assert q.tolist()[:2] == [[0] * 6, [127, 2, 4, -2, 0, -127]]
    # vLLM divides 127 / amax (IEEE) and multiplies; 127 * (1 / amax) would give 64.
    assert q.tolist()[3][:2] == [127, 63]
    assert s.view(-1).tolist()[:2] == [0.0, 1.0]
    q, s = per_token_quant_int8(x, "compressed-tensors")
    assert q.tolist()[0] == [0] * 6 and s[0].item() == torch.finfo(torch.float32).eps
    assert q.tolist()[2] == [127, 2, 4, -2, 2, -128] and s[2].item() == 1.0  # -amax -> -128
    for convention in ("vllm", "compressed-tensors"):
        q_ref, s_ref = per_token_quant_int8_ref(x, convention)
        q, s = per_token_quant_int8(x, convention)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_per_token_quant_fp8_group_major():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 96, generator=gen) * 3).to(DEVICE, DTYPE)
    q, scale = per_token_quant_fp8(x, 32, group_major=True)
    q_ref, scale_ref = per_token_quant_fp8_ref(x, 32)
    assert scale.shape == (5, 3) and scale.stride() == (1, 5)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    with pytest.raises(ValueError, match=r"group_major needs a 2-D x; got shape \(1, 5, 96\)"):
        per_token_quant_fp8(x[None], 32, group_major=True)


@pytest.mark.parametrize("group_size", [None, 32])
def test_per_token_quant_fp8(group_size):
    gen = torch.Generator().manual_seed(1)
    # magnitudes from 1e-6 to 1e3 reach e4m3's subnormals; row 1 is all zeros
    x = torch.randn(3, 128, generator=gen) * torch.logspace(-6, 3, 128)
    x[1] = 0
    x = x.to(DEVICE, DTYPE)
    q, scale = per_token_quant_fp8(x, group_size)
    q_ref, scale_ref = per_token_quant_fp8_ref(x, group_size)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 128 // (group_size or 128))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)
    back = (q.float().unflatten(-1, (scale.shape[-1], -1)) * scale.unsqueeze(-1)).flatten(-2)
    big = x.float().abs() >= scale.repeat_interleave(128 // scale.shape[-1], -1) * 2 ** -6
    assert ((back - x.float()).abs()[big] <= x.float().abs()[big] * 2 ** -4).all()  # half ulp
    assert (q[1].float() == 0).all()


# ---------------------------------------------------------------- W8A8 GEMMs

def test_w8a8_int8_gemm():
    gen = torch.Generator().manual_seed(2)
    m, k, n = 5, 64, 48
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w_scale, bias = torch.rand(n, generator=gen) * 0.01, torch.randn(n, generator=gen)
    x_q, x_scale = per_token_quant_int8_ref(x)
    args = [t.to(DEVICE) for t in (x_q, x_scale, w, w_scale, bias)]
    out = w8a8_int8_gemm(*args, out_dtype=torch.float32)
    ref = w8a8_int8_gemm_ref(*args, out_dtype=torch.float32)
    expected = (x_q.double() * x_scale.double()) @ (w.double() * w_scale.double()[:, None]).t()
    torch.testing.assert_close(ref.cpu().double(), expected + bias.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("config", [None, I8Config(16, 16, 32, 3, 2, 1, 1), I8Config(32, 32, 16, 1, 4, 1, 1)],
                         ids=["default", "split-k", "grouped"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (37, 96, 40), (3, 200, 24)])
def test_w8a8_int8_kernel_exact(m, k, n, config):
    """The Triton kernel (interpreter) accumulates in int32 and applies the scales in the
    reference's order: equal to the reference's float32 result, split or not, over
    masked tails in M, N and K; per-tensor weight scale and no bias too."""
    gen = torch.Generator().manual_seed(m + k + n)
    x_q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(m, 1, generator=gen)
    for w_scale, bias in ((torch.rand(n, generator=gen), torch.randn(n, generator=gen)),
                          (torch.rand((), generator=gen), None)):
        out = w8a8_int8_gemm(x_q, x_scale, w, w_scale, bias, torch.float32, config=config)
        ref = w8a8_int8_gemm_ref(x_q, x_scale, w, w_scale, bias, torch.float32)
        torch.testing.assert_close(out, ref, atol=0, rtol=2e-7)


def test_w8a8_kernel_strided_operands():
    # HF fp8 block checkpoints call it on column slices of x, w and the block scales.
    gen = torch.Generator().manual_seed(9)
    x = torch.randint(-128, 128, (5, 96), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (24, 96), generator=gen, dtype=torch.int8)
    xs, ws = torch.rand(5, 3, generator=gen), torch.rand(24, 3, generator=gen)
    cols = slice(32, 64)
    out = w8a8_int8_gemm(x[:, cols], xs[:, 1:2], w[:, cols], ws[:, 1], out_dtype=torch.float32)
    ref = w8a8_int8_gemm_ref(x[:, cols].contiguous(), xs[:, 1:2].contiguous(), w[:, cols].contiguous(),
                             ws[:, 1].contiguous(), out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, atol=0, rtol=2e-7)


def test_w8a8_int8_gemm_checks_shapes():
    x_q = torch.zeros(2, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"w_q has shape \(8, 16\); expected \(8, 32\)"):
        w8a8_int8_gemm(x_q, torch.ones(2, 1), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="w_scale has 3 values; expected 8"):
        w8a8_int8_gemm(x_q, torch.ones(2, 1), torch.zeros(8, 32, dtype=torch.int8), torch.ones(3))
    assert w8a8_int8_gemm(x_q[:0], torch.ones(0, 1), torch.zeros(8, 32, dtype=torch.int8),
                          torch.ones(8)).shape == (0, 8)


@pytest.mark.parametrize("m,config", [(5, None), (5, I8Config(16, 16, 32, 2, 1, 1, 1)), (70, None)],
                         ids=["triton", "triton-split-k", "scaled-mm"])
@pytest.mark.parametrize("per_tensor_w", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm(per_tensor_w, out_dtype, m, config):
    # Up to FP8_TRITON_MAX_M rows (or with a config) the Triton W8A8 kernel in float32
    # accumulation, above it torch._scaled_mm; both against the float32 reference.
    gen = torch.Generator().manual_seed(3)
    k, n = 64, 32
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    w_scale = w.abs().amax() / 448 if per_tensor_w else w.abs().amax(-1) / 448
    w_q = (w / w_scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
    x_q, x_scale = per_token_quant_fp8_ref(x)
    args = [t.to(DEVICE) for t in (x_q, x_scale, w_q, w_scale, bias)]
    ref = fp8_gemm_ref(*args, out_dtype=out_dtype)
    exact = x @ w.t() + bias.float()
    assert (ref.float().cpu() - exact).norm() / exact.norm() < 0.05  # fp8's own error
    if m > FP8_TRITON_MAX_M and config is None:
        try:
            out = fp8_gemm(*args, out_dtype=out_dtype)
        except RuntimeError as e:  # a torch without _scaled_mm for this device
            pytest.skip(f"torch._scaled_mm unavailable here: {e}")
    else:
        out = fp8_gemm(*args, out_dtype=out_dtype, config=config)
        if out_dtype == torch.float32:  # exact products, float32 sums: rounding only
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)


def _block_operands(m, k, n, group_k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen)
    w = torch.randn(n, k, generator=gen)
    w_scale = w.unflatten(1, (-1, group_k)).abs().amax(-1) / 448  # [N, K / group_k]
    w_q = (w / w_scale.repeat_interleave(group_k, 1)).to(torch.float8_e4m3fn)
    x_q, x_scale = per_token_quant_fp8_ref(x, group_k)
    return x, w, x_q, x_scale, w_q, w_scale, torch.randn(n, generator=gen)


@pytest.mark.parametrize("config", [None, I8Config(16, 16, 32, 3, 1, 1, 1), I8Config(32, 16, 16, 1, 2, 1, 1)],
                         ids=["default", "split-k", "block-k-below-group"])
@pytest.mark.parametrize("m,k,n,group_k", [(1, 64, 48, 32), (37, 128, 40, 64), (5, 96, 24, 32)])
def test_fp8_block_gemm(m, k, n, group_k, config):
    """Block-scaled fp8 (HF fp8 checkpoints): one kernel, each group's partial product
    scaled as it is added; against the float32 dequantize-then-matmul reference to
    float32 rounding, split or not, over masked M and N tails, with and without bias."""
    x, w, x_q, x_scale, w_q, w_scale, bias = _block_operands(m, k, n, group_k, m + k + n)
    ref = fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, group_k, bias, torch.float32)
    exact = x @ w.t() + bias
    assert (ref - exact).norm() / exact.norm() < 0.05  # fp8's own error
    # group-major scales (FP8BlockLinearMethod's layout): same values, other strides
    xs_gm, ws_gm = x_scale.t().contiguous().t(), w_scale.t().contiguous().t()
    for b, xs, ws in ((bias, x_scale, w_scale), (None, x_scale, w_scale), (bias, xs_gm, ws_gm)):
        out = fp8_block_gemm(x_q, xs, w_q, ws, group_k, b, torch.float32, config=config)
        expected = ref if b is not None else fp8_block_gemm_ref(x_q, xs, w_q, ws, group_k,
                                                                 out_dtype=torch.float32)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    out = fp8_block_gemm(x_q, x_scale, w_q, w_scale, group_k, bias, torch.bfloat16, config=config)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_fp8_block_scaled_mm_layout_and_fallback():
    # cuBLAS's weight-scale layout: one row of blocks per 128 output rows, rows padded to
    # a multiple of 4, viewed transposed; where cuBLAS cannot run (here: no GPU) the blocks
    # expand back over rows for the Triton kernel, which then computes the same product.
    n, k = 256, 384
    x, w, x_q, x_scale, w_q, w_scale, bias = _block_operands(5, k, n, 128, 7)
    w_scale = w_scale.unflatten(0, (-1, 128))[:, :1].expand(-1, 128, -1).reshape(n, -1)  # 128x128 blocks
    blocks = block_scales_for_cublas(w_scale)
    assert blocks.shape == (3, 2) and blocks.stride() == (1, 4)
    torch.testing.assert_close(blocks.t(), w_scale[::128].float())
    out = fp8_block_scaled_mm(x_q, x_scale, w_q, blocks, bias, torch.float32)
    ref = fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, 128, bias, torch.float32)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="N is 200 with 128-row blocks"):
        block_scales_for_cublas(torch.ones(200, 3))
    with pytest.raises(ValueError, match="w_blocks has shape"):
        fp8_block_scaled_mm(x_q, x_scale, w_q, blocks[:, :1], None)


def test_fp8_block_gemm_routes_large_batches_to_cublas(monkeypatch):
    # From FP8_BLOCK_CUBLAS_MIN_M rows with cuBLAS's layout of the blocks, fp8_block_gemm
    # hands the product to torch._scaled_mm. A stand-in checks the operands as cuBLAS's
    # block scaling takes them (M a multiple of 4, activation scales outer-dim-major,
    # weight scales [K/128, N/128] with a row stride padded to 4) and computes the product.
    from raylm.kernels.quant import fp8_block as quant_gemm

    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        m4, k = a.shape
        assert m4 % 4 == 0 and b.shape == (k, scale_b.shape[1] * 128) and b.stride(0) == 1
        assert scale_a.shape == (m4, k // 128) and scale_a.stride() == (1, m4)
        assert scale_b.shape == (k // 128, b.shape[1] // 128) and scale_b.stride(0) == 1
        assert scale_b.stride(1) % 4 == 0 and scale_b.stride(1) >= k // 128
        calls.append(m4)
        xa = a.float() * scale_a.repeat_interleave(128, 1)
        wb = b.float() * scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return (xa @ wb).to(out_dtype)

    monkeypatch.setattr(quant_gemm, "block_scaled_mm_ok", lambda x_q, k, n, group_k: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    k, n = 512, 256
    for m in (quant_gemm.FP8_BLOCK_CUBLAS_MIN_M, quant_gemm.FP8_BLOCK_CUBLAS_MIN_M + 2):
        x, w, x_q, x_scale, w_q, w_scale, bias = _block_operands(m, k, n, 128, m)
        w_scale = w_scale.unflatten(0, (-1, 128))[:, :1].expand(-1, 128, -1).reshape(n, -1)  # 128x128 blocks
        x_scale_gm = x_scale.t().contiguous().t()
        out = quant_gemm.fp8_block_gemm(x_q, x_scale_gm, w_q, w_scale, 128, bias, torch.float32,
                                        w_blocks=block_scales_for_cublas(w_scale))
        ref = fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, 128, bias, torch.float32)
        assert out.shape == (m, n) and calls[-1] == -(-m // 4) * 4
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    calls.clear()  # fewer rows stay on the Triton kernel
    x, w, x_q, x_scale, w_q, w_scale, bias = _block_operands(5, k, n, 128, 5)
    quant_gemm.fp8_block_gemm(x_q, x_scale, w_q, w_scale, 128, w_blocks=block_scales_for_cublas(w_scale))
    assert calls == []


def test_fp8_block_gemm_checks():
    x_q = torch.zeros(2, 64, dtype=torch.float8_e4m3fn)
    w_q = torch.zeros(8, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"x_scale has shape \(2, 1\); expected \(2, 2\)"):
        fp8_block_gemm(x_q, torch.ones(2, 1), w_q, torch.ones(8, 2), 32)
    with pytest.raises(ValueError, match=r"w_scale has shape \(8, 1\); expected \(8, 2\)"):
        fp8_block_gemm(x_q, torch.ones(2, 2), w_q, torch.ones(8, 1), 32)
    with pytest.raises(ValueError, match="K is 64; fp8_block_gemm needs a multiple of group_k 48"):
        fp8_block_gemm(x_q, torch.ones(2, 1), w_q, torch.ones(8, 1), 48)
    with pytest.raises(ValueError, match="config.block_k 32 does not divide group_k 16"):
        fp8_block_gemm(x_q, torch.ones(2, 4), w_q, torch.ones(8, 4), 16, config=I8Config(16, 16, 32, 1, 1, 1, 1))
