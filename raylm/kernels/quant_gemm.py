"""Quantized linear layers' matmuls: weight-only 4/8-bit (GPTQ and AWQ packing) as a
Triton kernel that dequantizes tiles on the fly, W8A8 int8 (and fp8 at small M) as a
Triton kernel with the scales in its epilogue, fp8 at larger M through
torch._scaled_mm, each with a plain PyTorch reference (dequantize, then matmul), which
is also the path for CPU.

Packing, as the checkpoints store it (int32 words, value j of a word at bits
j*bits .. j*bits+bits-1):
- GPTQ (AutoGPTQ / GPTQModel): qweight [K // pack, N] packs 32 // bits consecutive input
  rows: row pack*i + j sits in word i at slot j. qzeros [groups, N // pack] packs output
  columns the same way along N. Input row k belongs to group g_idx[k] (act-order), or
  k // group_size without g_idx; group_size -1 means one group. GPTQ v1 checkpoints store
  zero - 1: pass zero_offset=1 (added after unpacking and masking, as vLLM does).
- AWQ (AutoAWQ GEMM, awq/utils/packing_utils.py; vLLM awq_triton.py): 4-bit only,
  qweight [K, N // 8] and qzeros [groups, N // 8] pack 8 output columns per word in
  AWQ_ORDER: slot i holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i], so column j
  sits in slot AWQ_REVERSE_ORDER[j] = [0, 4, 1, 5, 2, 6, 3, 7][j]. Rows are not packed.
Dequantization: w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]; without qzeros the zero
is 2 ** (bits - 1) (symmetric).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
LAYOUTS = ("gptq", "awq")



# ---------------------------------------------------------------- references (CPU path)

def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] int32 -> [R * 32 // bits, C]: slot j of word i is row (32 // bits) * i + j."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `unpack_rows`: [R, C] ints in [0, 2**bits) -> [R * bits // 32, C] int32."""
    pack = 32 // bits
    v = values.to(torch.int64).reshape(-1, pack, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device).view(1, -1, 1)
    words = (v << shifts).sum(dim=1)  # < 2**32: no two slots overlap
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack_cols(packed: torch.Tensor, bits: int, order: Optional[list] = None) -> torch.Tensor:
    """[R, C] int32 -> [R, C * 32 // bits]; column j of a word sits in slot order[j]
    (slot j without an order)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if order is not None:
        shifts = shifts[order]
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


def unpack_gptq(qweight: torch.Tensor, qzeros: Optional[torch.Tensor], bits: int = 4):
    """GPTQ-packed -> (q int32 [K, N], z int32 [groups, N] or None), stored values
    (no zero_offset applied)."""
    _check_bits(bits, "gptq")
    z = None if qzeros is None else _unpack_cols(qzeros, bits)
    return unpack_rows(qweight, bits), z


def unpack_awq(qweight: torch.Tensor, qzeros: Optional[torch.Tensor], bits: int = 4):
    """AWQ-packed -> (q int32 [K, N], z int32 [groups, N] or None) in natural column order."""
    _check_bits(bits, "awq")
    z = None if qzeros is None else _unpack_cols(qzeros, bits, AWQ_REVERSE_ORDER)
    return _unpack_cols(qweight, bits, AWQ_REVERSE_ORDER), z


def _dequantize(q, z, scales, g_idx, group_size, bits, zero_offset):
    k = q.shape[0]
    if g_idx is None:
        group_size = k if group_size == -1 else group_size
        g_idx = torch.arange(k, device=q.device) // group_size
    g_idx = g_idx.long()
    zeros = 1 << (bits - 1) if z is None else (z + zero_offset)[g_idx]
    return (q - zeros).float() * scales.float()[g_idx]


def dequantize_gptq(qweight, scales, qzeros, g_idx=None, group_size=128, bits=4, zero_offset=0):
    """GPTQ-packed weight -> float32 [K, N] (the transpose of nn.Linear's weight)."""
    q, z = unpack_gptq(qweight, qzeros, bits)
    return _dequantize(q, z, scales, g_idx, group_size, bits, zero_offset)


def dequantize_awq(qweight, scales, qzeros, group_size=128, bits=4, zero_offset=0):
    """AWQ-packed weight -> float32 [K, N]."""
    q, z = unpack_awq(qweight, qzeros, bits)
    return _dequantize(q, z, scales, None, group_size, bits, zero_offset)


def w4a16_gemm_ref(x, qweight, scales, qzeros, g_idx, group_size, layout,
                   bits=4, zero_offset=0, bias=None):
    """Plain PyTorch: dequantize to float32, matmul in float32, cast to x's dtype."""
    _check_layout(layout)
    if layout == "gptq":
        w = dequantize_gptq(qweight, scales, qzeros, g_idx, group_size, bits, zero_offset)
    else:
        w = dequantize_awq(qweight, scales, qzeros, group_size, bits, zero_offset)
    out = x.float() @ w
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ---------------------------------------------------------------- Triton kernel

class W4Config(NamedTuple):
    """One launch configuration of the fused W4A16 kernel. split_k > 1 splits K across
    programs, each writing a float32 partial sum that a second kernel adds up in a fixed
    order (so results don't depend on timing); expand loads each packed word once and
    unpacks it in registers instead of loading it once per value it holds. (A CUDA-core
    GEMV variant, one row per program, measured 1.07-3.8x slower than these tiles at
    M=1 on the H100, 2026-11-27, and was dropped.)"""
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    expand: bool
    num_warps: int
    num_stages: int


# Fixed launch configurations, so CUDA graphs can capture. Below DEQUANT_MIN_M rows the
# fused kernel streams the packed weight once per block_m rows; with few output tiles the
# weight is split along K so the GPU has enough programs to keep HBM busy. Chosen by
# benchmarks/w4a16_tune.py on the H100 (2026-11-27, Llama-3.1-8B's four GEMMs at M=1:
# GPTQ 129.7 us per layer, AWQ 148.7, bf16 cuBLAS 161.8; at M=16/32/64 GPTQ 134/149/170 us
# against bf16's 164/166/169 and dequantize-then-cuBLAS's 375).
DECODE_CONFIG = {"gptq": W4Config(16, 256, 64, 1, True, 4, 4),
                 "awq": W4Config(16, 256, 64, 1, True, 8, 4)}
INTERPRET_CONFIG = W4Config(16, 32, 32, 1, False, 1, 1)
MAX_BLOCK_M = 64
# Programs to aim for when choosing split_k (the tune's best: two per SM of an H100).
TARGET_PROGRAMS = 2 * 132
# From this many rows, dequantize the weight once and use a dense matmul (cuBLAS). One
# Llama-3.1-8B layer on the H100 (2026-11-27): GPTQ fused 288 us against 443 at M=128,
# 555 against 473 at M=256; AWQ fused 402 against 378 at M=128.
DEQUANT_MIN_M = {"gptq": 256, "awq": 128}
# (BLOCK_K, BLOCK_N, expand) of the dequantizing kernel: AWQ's 32-byte rows of words need
# the wide, unpacked-in-registers tiles (1169 -> 359 us per layer); GPTQ measured 375 us
# with (64, 128) as loaded and 425 with (64, 256) unpacked.
DEQUANT_CONFIG = {"gptq": (64, 128, False), "awq": (64, 256, True)}


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, n0, offs_k, offs_n, mask_k, mask_n, N, K, group_size,
                  zero_offset, AWQ: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  HAS_G_IDX: tl.constexpr, TILE_GROUP: tl.constexpr, EXPAND: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] float32 weight tile at rows offs_k = k0 + arange(BLOCK_K),
    columns offs_n = n0 + arange(BLOCK_N) (k0, n0 multiples of BLOCK_K, BLOCK_N)."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    n_words = N // PACK
    col_word = offs_n // PACK  # where column n sits in the N-packed tensors
    if AWQ:
        col_shift = ((offs_n % 2) * 4 + (offs_n % 8) // 2) * BITS  # AWQ_REVERSE_ORDER
    else:
        col_shift = (offs_n % PACK) * BITS
    mask_kn = mask_k[:, None] & mask_n[None, :]
    if EXPAND:  # one load per packed word, unpacked in registers
        slots = tl.arange(0, PACK)
        if AWQ:  # [BLOCK_K, BLOCK_N // 8] words -> [BLOCK_K, BLOCK_N // 8, 8] -> [BLOCK_K, BLOCK_N]
            words_n = n0 // PACK + tl.arange(0, BLOCK_N // PACK)
            words = tl.load(qw_ptr + offs_k[:, None] * n_words + words_n[None, :],
                            mask=mask_k[:, None] & (words_n < n_words)[None, :], other=0)
            shifts = ((slots % 2) * 4 + slots // 2) * BITS
            q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_K, BLOCK_N))
        else:  # [BLOCK_K // PACK, BLOCK_N] words -> [BLOCK_K // PACK, PACK, BLOCK_N] -> [BLOCK_K, BLOCK_N]
            words_k = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            words = tl.load(qw_ptr + words_k[:, None] * N + offs_n[None, :],
                            mask=(words_k < K // PACK)[:, None] & mask_n[None, :], other=0)
            q = tl.reshape((words[:, None, :] >> (slots * BITS)[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
    elif AWQ:
        words = tl.load(qw_ptr + offs_k[:, None] * n_words + col_word[None, :], mask=mask_kn, other=0)
        q = (words >> col_shift[None, :]) & MASK
    else:
        # each word is read once per row it packs; the repeats hit L1
        words = tl.load(qw_ptr + (offs_k // PACK)[:, None] * N + offs_n[None, :], mask=mask_kn, other=0)
        q = (words >> ((offs_k % PACK) * BITS)[:, None]) & MASK
    if TILE_GROUP:  # the whole K tile is in one group: one row of scales and zeros
        g = k0 // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_ZEROS:
            zw = tl.load(qz_ptr + g * n_words + col_word, mask=mask_n, other=0)[None, :]
    else:
        if HAS_G_IDX:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // group_size
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
        if HAS_ZEROS:
            zw = tl.load(qz_ptr + g[:, None] * n_words + col_word[None, :], mask=mask_kn, other=0)
    if HAS_ZEROS:
        z = ((zw >> col_shift[None, :]) & MASK) + zero_offset
    else:
        z = 1 << (BITS - 1)
    return (q - z).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, group_size, zero_offset, stride_xm, stride_om,
    AWQ: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    TILE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, n] (or, with K split across program_id(2), that split's float32 partial sum
    at out + split * M * N) for one [BLOCK_M, BLOCK_N] tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # M * K can pass 2**31 in long prefills
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, pid_n * BLOCK_N, offs_k, offs_n, mask_k, mask_n, N, K,
                          group_size, zero_offset, AWQ, BITS, HAS_ZEROS, HAS_G_IDX, TILE_GROUP,
                          EXPAND, BLOCK_K, BLOCK_N)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptr += pid_s.to(tl.int64) * M * N
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _split_k_sum_kernel(part_ptr, bias_ptr, out_ptr, numel, N, SPLIT_K: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over s of part[s] (+ bias), in order s = 0, 1, ..., cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, qz_ptr, g_ptr, out_ptr, N, K, group_size, zero_offset,
    AWQ: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    TILE_GROUP: tl.constexpr, EXPAND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The whole weight, dequantized into out [K, N] (for a dense matmul at large M)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, g_ptr, k0, tl.program_id(0) * BLOCK_N, offs_k, offs_n, mask_k, mask_n, N, K,
                      group_size, zero_offset, AWQ, BITS, HAS_ZEROS, HAS_G_IDX, TILE_GROUP,
                      EXPAND, BLOCK_K, BLOCK_N)
    tl.store(out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")


def _check_bits(bits: int, layout: str) -> None:
    allowed = (4, 8) if layout == "gptq" else (4,)
    if bits not in allowed:
        raise ValueError(f"bits is {bits}; {layout} supports {allowed}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected}")


def pick_config(m: int, k: int, n: int, layout: str, group_size: int = 128,
                has_g_idx: bool = False) -> W4Config:
    """The fused kernel's launch configuration for an [m, k] @ [k, n] product: the
    layout's decode tiles with block_m the power of two >= m (16 to MAX_BLOCK_M), split
    along K until there are about TARGET_PROGRAMS programs (never splitting a K tile).
    A K tile stays within one group where it can (block_k shrinks to a smaller
    power-of-two group size): then each tile loads one row of scales and zeros. Where
    rows of a tile fall in different groups (g_idx, odd group sizes) each weight value
    loads its own scale and zero, and wide tiles with deep pipelines would run out of
    shared memory: at most 64 columns, two stages."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRET_CONFIG
    cfg = DECODE_CONFIG[layout]
    cfg = cfg._replace(block_m=min(MAX_BLOCK_M, max(16, 1 << (m - 1).bit_length())))
    gs = k if group_size == -1 else group_size
    if not has_g_idx and gs < cfg.block_k and gs >= 16 and gs & (gs - 1) == 0:
        cfg = cfg._replace(block_k=gs)
    if has_g_idx or gs % cfg.block_k:
        cfg = cfg._replace(block_n=min(cfg.block_n, 64), num_stages=min(cfg.num_stages, 2))
    return with_split(cfg, m, k, n)


def with_split(cfg: W4Config, m: int, k: int, n: int, target: int = 0) -> W4Config:
    """cfg with split_k raised until the grid has about `target` (default
    TARGET_PROGRAMS) programs, at most one K tile per split."""
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = max(1, min((target or TARGET_PROGRAMS) // tiles, triton.cdiv(k, cfg.block_k)))
    return cfg._replace(split_k=split)


def _k_splits(k: int, block_k: int, split_k: int) -> tuple:
    """(splits, K per split) for split_k requested parts of K: whole K tiles per split,
    at most one split per tile, and no split left empty."""
    k_tiles = triton.cdiv(k, block_k)
    k_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles))) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def _check_config(cfg: W4Config, bits: int) -> None:
    pack = 32 // bits
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"config.{name} is {v}; a power of two >= 16 is needed (tl.dot)")
    if cfg.split_k < 1:
        raise ValueError(f"config.split_k is {cfg.split_k}; at least 1 is needed")
    if cfg.block_k % pack or cfg.block_n % pack:
        raise ValueError(f"config block_k {cfg.block_k} / block_n {cfg.block_n}: multiples of {pack} needed")


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               qzeros: Optional[torch.Tensor], g_idx: Optional[torch.Tensor], group_size: int,
               layout: str, bits: int = 4, zero_offset: int = 0,
               bias: Optional[torch.Tensor] = None, dequant_min_m: Optional[int] = None,
               config: Optional[W4Config] = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16; float32 in the interpreter) @ a GPTQ- or AWQ-packed weight
    (see the module docstring) -> [..., N] in x's dtype, accumulated in float32.
    The dequantized tile is rounded to x's dtype before the dot (tensor cores). From
    `dequant_min_m` rows (default DEQUANT_MIN_M[layout]) the weight is dequantized whole into x's
    dtype and multiplied densely instead. `config` overrides the fused kernel's launch
    configuration (`pick_config`), for tuning."""
    _check_layout(layout)
    _check_bits(bits, layout)
    pack = 32 // bits
    k = x.shape[-1]
    n = scales.shape[1]
    num_groups = scales.shape[0]
    if layout == "gptq":
        _check_shape("qweight", qweight, (k // pack, n))
        if k % pack:
            raise ValueError(f"x has {k} input features; gptq {bits}-bit needs a multiple of {pack}")
    else:
        _check_shape("qweight", qweight, (k, n // pack))
        if g_idx is not None:
            raise ValueError("g_idx is given; awq has no act-order")
    if n % pack:
        raise ValueError(f"scales has {n} output features; a multiple of {pack} is needed")
    expected_groups = 1 if group_size == -1 else -(-k // group_size)
    if g_idx is None and num_groups != expected_groups:
        raise ValueError(f"scales has {num_groups} groups; K={k} and group_size={group_size} "
                         f"give {expected_groups}")
    if qzeros is not None:
        _check_shape("qzeros", qzeros, (num_groups, n // pack))
    if g_idx is not None:
        _check_shape("g_idx", g_idx, (k,))
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    gs = k if group_size == -1 else group_size
    flags = dict(AWQ=layout == "awq", BITS=bits, HAS_ZEROS=qzeros is not None, HAS_G_IDX=g_idx is not None)
    qz = qzeros if qzeros is not None else qweight
    gi = g_idx if g_idx is not None else qweight
    if config is None and m >= (DEQUANT_MIN_M[layout] if dequant_min_m is None else dequant_min_m):
        # Many rows: dequantize the weight once, then a dense matmul (cuBLAS on a GPU).
        block_k, block_n, expand = DEQUANT_CONFIG[layout]
        w = torch.empty(k, n, dtype=x.dtype, device=x.device)
        _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            qweight, scales, qz, gi, w, n, k, gs, zero_offset, **flags,
            TILE_GROUP=g_idx is None and (num_groups == 1 or gs % block_k == 0), EXPAND=expand,
            BLOCK_N=block_n, BLOCK_K=block_k)
        out = torch.matmul(x2, w) if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        return out.view(*x.shape[:-1], n)
    cfg = config if config is not None else pick_config(m, k, n, layout, group_size, g_idx is not None)
    _check_config(cfg, bits)
    split, k_per_split = _k_splits(k, cfg.block_k, cfg.split_k)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _w4a16_kernel[grid](
        x2, qweight, scales, qz, gi, bias if bias is not None else scales, target,
        m, n, k, k_per_split, gs, zero_offset, x2.stride(0), n, **flags,
        TILE_GROUP=g_idx is None and (num_groups == 1 or gs % cfg.block_k == 0),
        HAS_BIAS=bias is not None and split == 1, EXPAND=cfg.expand,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else scales, out, m * n, n, SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=block)
    return out.view(*x.shape[:-1], n)


# ---------------------------------------------------------------- W4A16, repacked for the GPU
#
# 4-bit GPTQ, AWQ and compressed-tensors layers are repacked once at load on the GPU into
# one layout ("w4r") that the kernel below dequantizes with integer masks and packed
# 16-bit arithmetic instead of conversions. The PTX of the original-layout kernel spends,
# per weight value, an int-to-float and a float-to-bf16 conversion, a float multiply and a
# scalar 16-bit shared-memory store (9.6 SASS instructions per value in its decode tile,
# compiled offline for sm90); this one spends about 5, and its product runs as a wgmma
# with the weight tile as the left operand (out.T = w.T @ x.T).
#
# - qweight [K // 8, N] int32, 8 consecutive input rows per word like GPTQ, but row
#   8 r + p of word r sits in slot W4R_SLOT[p] (bits 4 slot .. 4 slot + 3). Then for
#   i in 0..3, (word >> 4 i) & 0x000F000F holds slots i and i + 4 as two 16-bit lanes;
#   OR-ed with the bit pattern of 128 in bf16 (0x4300; 1024 = 0x6400 in fp16) each lane
#   reads as 128 + q (1024 + q), exactly.
# - zb [groups, N] in the activation dtype: 128 + z (1024 + z for fp16), the zero point
#   (+ GPTQ v1's offset; 8 when symmetric) on the same base, so lane - zb = q - z exactly.
# - scales [groups, N] in the activation dtype (fp16 checkpoint scales are rounded to
#   bf16 once here); w = (lane - zb) * s rounds once, as (q - z) * s in float32 then to
#   bf16 does when s is a bf16 value.
# The pairs come out of the kernel's joins in the order p = 4 d1 + 2 d2 + e with slot
# d1 + 2 d2 + 4 (1 - e) (see _w4r_tile), which gives W4R_SLOT.
W4R_SLOT = [4, 0, 6, 2, 5, 1, 7, 3]
W4R_BASE = {torch.bfloat16: 128, torch.float16: 1024, torch.float32: 128}
W4R_MAGIC = {torch.bfloat16: 0x43004300, torch.float16: 0x64006400}


def repack_w4(q: torch.Tensor, z: Optional[torch.Tensor], scales: torch.Tensor, dtype: torch.dtype,
              zero_offset: int = 0):
    """Unpacked 4-bit values q [K, N] (0..15) and zero points z [groups, N] (None:
    symmetric, zero 8), with their scales -> (qweight [K // 8, N] int32, scales, zb) in
    the w4r layout for activations of `dtype` (see above)."""
    k, n = q.shape
    if k % 8:
        raise ValueError(f"K is {k}; the w4r layout packs 8 rows per word, so a multiple of 8 is needed")
    if dtype not in W4R_BASE:
        raise ValueError(f"dtype is {dtype}; w4r supports {list(W4R_BASE)}")
    rows = q.reshape(k // 8, 8, n)
    words = torch.zeros(k // 8, n, dtype=torch.int64, device=q.device)
    for p, slot in enumerate(W4R_SLOT):  # row 8 r + p -> slot W4R_SLOT[p]
        words |= rows[:, p].to(torch.int64) << (4 * slot)
    qweight = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    zeros = torch.full_like(scales, 8, dtype=torch.int32) if z is None else z.to(torch.int32) + zero_offset
    zb = (zeros + W4R_BASE[dtype]).to(dtype)
    return qweight, scales.to(dtype).contiguous(), zb.contiguous()


def dequantize_w4r(qweight: torch.Tensor, scales: torch.Tensor, zb: torch.Tensor, group_size: int) -> torch.Tensor:
    """The w4r layout -> float32 [K, N] (the reference for its kernel)."""
    q = unpack_rows(qweight, 4).reshape(-1, 8, qweight.shape[1])[:, W4R_SLOT].reshape(-1, qweight.shape[1])
    k = q.shape[0]
    gs = k if group_size == -1 else group_size
    g = torch.arange(k, device=q.device) // gs
    return (q.float() + W4R_BASE[zb.dtype] - zb.float()[g]) * scales.float()[g]


# Decode and small batches: (largest M, config); the last entry serves up to W4R_DEQUANT_MIN_M.
# block_m is the wgmma's N (the activation rows), block_n its M (output features). Chosen by
# benchmarks/w4a16_tune.py --stages w4r on one H200 (2026-11-27, Llama-3.1-8B's four GEMMs):
# 94 / 96 / 132 / 180 / 283 us per layer at M = 1 / 16 / 64 / 128 / 256, against bf16
# cuBLAS's 116 / 116 / 126 / 135 / 181 and, at M <= 128, the GPTQ-layout kernel's
# 138 / 138 / 177 / 289. Small M splits K for four times TARGET_PROGRAMS programs (enough
# resident warps to cover the loads: 104 us at 2x, 111 at 1x).
W4R_CONFIGS = (
    (32, W4Config(16, 64, 128, 1, False, 4, 3)),
    (64, W4Config(64, 128, 128, 1, False, 8, 3)),
    (128, W4Config(128, 64, 128, 1, False, 4, 3)),
    (None, W4Config(256, 128, 64, 1, False, 8, 3)),
)
W4R_SPLIT_TARGET = {16: 4 * TARGET_PROGRAMS}  # block_m -> programs to aim for
W4R_INTERPRET_CONFIG = W4Config(16, 32, 32, 1, False, 1, 1)
# From this many rows the weight is dequantized whole and multiplied by cuBLAS: at M=256
# 342 us against the fused kernel's 283, at 384 411 against 510 (best tile).
W4R_DEQUANT_MIN_M = 257
W4R_DEQUANT_TILE = (128, 64)  # (BLOCK_N, BLOCK_K) of the dequantizing kernel


@triton.jit
def _w4r_tile(qw_ptr, s_ptr, zb_ptr, k0, offs_n, mask_n, N, K, GROUP: tl.constexpr, MAGIC: tl.constexpr,
              BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight tile at rows k0 .. k0 + BLOCK_K, columns offs_n, transposed:
    [BLOCK_N, BLOCK_K] in the scales' dtype (float32 without MAGIC, where zb is BASE + z).
    GROUP: rows per group (a multiple of BLOCK_K), 0 for one group."""
    words_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_ptr + words_k[None, :] * N + offs_n[:, None],
                    mask=mask_n[:, None] & (words_k < K // 8)[None, :], other=0)
    if GROUP:
        g = k0 // GROUP
    else:
        g = 0
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)[:, None]
    zb = tl.load(zb_ptr + g * N + offs_n, mask=mask_n, other=0.0)[:, None]
    if MAGIC:
        t0 = (words & 0x000F000F) | MAGIC
        t1 = ((words >> 4) & 0x000F000F) | MAGIC
        t2 = ((words >> 8) & 0x000F000F) | MAGIC
        t3 = ((words >> 12) & 0x000F000F) | MAGIC
        t = tl.join(tl.join(t0, t1), tl.join(t2, t3))  # [.., d1, d2]: t index d1 + 2 d2
        # high lane first: the order the 16-bit pairs are then stored in (fewer permutes)
        lanes = tl.join((t >> 16).to(tl.int16), t.to(tl.int16))  # [.., d1, d2, e]
        v = tl.reshape(lanes, (BLOCK_N, BLOCK_K)).to(s.dtype, bitcast=True)
        return (v - zb) * s
    else:
        p = tl.arange(0, 8)
        slot = p // 4 + 2 * ((p // 2) % 2) + 4 * (1 - p % 2)  # W4R_SLOT
        q = tl.reshape((words[:, :, None] >> (slot * 4)[None, None, :]) & 15, (BLOCK_N, BLOCK_K))
        return ((q + BASE).to(tl.float32) - zb.to(tl.float32)) * s.to(tl.float32)


@triton.jit
def _w4r_kernel(x_ptr, qw_ptr, s_ptr, zb_ptr, bias_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_om,
                GROUP: tl.constexpr, MAGIC: tl.constexpr, BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] for one [BLOCK_M, BLOCK_N] tile (or, K split across program_id(2), that
    split's float32 partial at out + split * M * N), computed transposed. GROUP as in
    _w4r_tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        w = _w4r_tile(qw_ptr, s_ptr, zb_ptr, k0, offs_n, mask_n, N, K, GROUP, MAGIC, BASE, BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None],
                     mask=mask_m[None, :] & (offs_k < K)[:, None], other=0.0)
        acc += tl.dot(w.to(xt.dtype), xt)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    out_ptr += pid_s.to(tl.int64) * M * N
    tl.store(out_ptr + rows[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[None, :] & mask_n[:, None])


@triton.jit
def _w4r_dequant_kernel(qw_ptr, s_ptr, zb_ptr, out_ptr, N, K, GROUP: tl.constexpr, MAGIC: tl.constexpr,
                        BASE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole weight, dequantized into out [N, K] (nn.Linear's layout)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    w = _w4r_tile(qw_ptr, s_ptr, zb_ptr, k0, offs_n, mask_n, N, K, GROUP, MAGIC, BASE, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k < K)[None, :])


def pick_w4r_config(m: int, k: int, n: int, group_size: int) -> W4Config:
    """The w4r kernel's configuration for [m, k] @ [k, n]: the bucket's tile, block_k
    within one group, split along K to about TARGET_PROGRAMS programs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg = W4R_INTERPRET_CONFIG
    else:
        cfg = next(c for limit, c in W4R_CONFIGS if limit is None or m <= limit)
    gs = k if group_size == -1 else group_size
    while gs % cfg.block_k and cfg.block_k > 16:
        cfg = cfg._replace(block_k=cfg.block_k // 2)
    return with_split(cfg, m, k, n, W4R_SPLIT_TARGET.get(cfg.block_m, 0))


def w4r_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zb: torch.Tensor, group_size: int,
             bias: Optional[torch.Tensor] = None, dequant_min_m: Optional[int] = None,
             config: Optional[W4Config] = None) -> torch.Tensor:
    """x [..., K] @ a w4r-packed weight (see repack_w4) -> [..., N] in x's dtype,
    accumulated in float32. x, scales and zb share one dtype: bf16 or fp16 on the GPU
    (integer-mask dequantization), also float32 in the interpreter. From `dequant_min_m`
    rows (default W4R_DEQUANT_MIN_M) the weight is dequantized whole and multiplied
    densely; `config` forces the fused kernel with that configuration (tuning)."""
    k = x.shape[-1]
    n = scales.shape[1]
    num_groups = scales.shape[0]
    _check_shape("qweight", qweight, (k // 8, n))
    if k % 8:
        raise ValueError(f"x has {k} input features; the w4r layout needs a multiple of 8")
    expected = 1 if group_size == -1 else -(-k // group_size)
    if num_groups != expected:
        raise ValueError(f"scales has {num_groups} groups; K={k} and group_size={group_size} give {expected}")
    _check_shape("zb", zb, (num_groups, n))
    if not (x.dtype == scales.dtype == zb.dtype) or x.dtype not in W4R_BASE:
        raise ValueError(f"x, scales and zb have dtypes {x.dtype}, {scales.dtype}, {zb.dtype}; one of "
                         f"{list(W4R_BASE)} is needed")
    # The interpreter has no 16-bit bit patterns: there the kernel's float32 path, same values.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    magic = 0 if interpreted else W4R_MAGIC.get(x.dtype, 0)
    if not magic and not interpreted:
        raise ValueError(f"x has dtype {x.dtype}; the w4r kernel takes {list(W4R_MAGIC)} on the GPU")
    base = W4R_BASE[x.dtype]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    one_group = group_size == -1 or num_groups == 1
    if config is None and m >= (W4R_DEQUANT_MIN_M if dequant_min_m is None else dequant_min_m):
        block_n, block_k = W4R_DEQUANT_TILE
        while not one_group and group_size % block_k and block_k > 16:
            block_k //= 2
        w = torch.empty(n, k, dtype=x.dtype, device=x.device)
        _w4r_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            qweight, scales, zb, w, n, k, GROUP=0 if one_group else group_size, MAGIC=magic, BASE=base,
            BLOCK_N=block_n, BLOCK_K=block_k)
        out = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
        return out.view(*x.shape[:-1], n)
    cfg = config if config is not None else pick_w4r_config(m, k, n, group_size)
    _check_config(cfg, 4)
    if not one_group and group_size % cfg.block_k:
        raise ValueError(f"config.block_k {cfg.block_k} does not divide group_size {group_size}")
    split, k_per_split = _k_splits(k, cfg.block_k, cfg.split_k)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _w4r_kernel[grid](x2, qweight, scales, zb, bias if bias is not None else scales, target,
                      m, n, k, k_per_split, x2.stride(0), n, GROUP=0 if one_group else group_size,
                      MAGIC=magic, BASE=base, HAS_BIAS=bias is not None and split == 1, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
    if split > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else scales, out, m * n, n, SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=block)
    return out.view(*x.shape[:-1], n)


# ---------------------------------------------------------------- W8A8: int8 and fp8

def _scale_epilogue(acc, x_scale, w_scale, bias, out_dtype):
    out = acc.float() * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w8a8_int8_gemm_ref(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16):
    """Plain PyTorch: exact integer products (float64 holds them), then the scales."""
    acc = x_q.double() @ w_q.double().t()
    return _scale_epilogue(acc, x_scale, w_scale, bias, out_dtype)


class I8Config(NamedTuple):
    """Launch configuration of the W8A8 int8 kernel: output tile BLOCK_M x BLOCK_N, K
    tile, K split over `split_k` programs (int32 partial sums, added exactly), tiles
    grouped `group_m` rows of tiles at a time so neighbouring programs share weight
    tiles in L2, Triton warps and software-pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    group_m: int
    num_warps: int
    num_stages: int


# (largest M, config) in increasing M; the last entry serves every larger M. Fixed per
# M bucket so CUDA graphs capture one kernel per padded batch size. Chosen by
# benchmarks/int8_tune.py on the H100 (2026-11-27, one Llama-3.1-8B layer's four GEMMs,
# activation quantization not included): 90.6 / 99.8 / 115.2 / 152.2 / 221.7 / 1642 us
# at M = 1 / 64 / 128 / 256 / 512 / 4096, against bf16 cuBLAS's 162.0 / 169.4 / 177.9 /
# 200.8 / 303.1 / 2466 and torch._int_mm with the scales in PyTorch's 145.2 / 164.6 /
# 214.0 / 346.3 / 596.2 / 4051.
INT8_CONFIGS = (
    (16, I8Config(16, 64, 256, 1, 1, 4, 3)),
    (32, I8Config(32, 64, 256, 1, 1, 4, 3)),
    (64, I8Config(64, 64, 256, 1, 1, 4, 3)),
    (256, I8Config(128, 64, 128, 1, 8, 8, 4)),
    (None, I8Config(128, 128, 128, 1, 8, 8, 3)),
)
INT8_INTERPRET_CONFIG = I8Config(16, 32, 32, 1, 1, 1, 1)


@triton.jit
def _w8a8_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
    stride_am, stride_bn, stride_om, w_scale_stride, a_scale_stride, w_group_stride, a_group_stride,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of (a @ b.T) * a_scale * b_scale (+ bias), with a
    [M, K] and b [N, K] both int8 (INT8: exact int32 accumulation) or both fp8 e4m3
    (float32 accumulation); or, with PARTIAL, that K split's sum at out + split * M * N.
    GROUP_K > 0 (fp8, block-scaled): one scale per row of a and per row of b for each
    GROUP_K-wide slice of K (a_scale [M, K / GROUP_K] with strides (a_scale_stride,
    a_group_stride), b_scale [N, K / GROUP_K] with (w_scale_stride, w_group_stride)):
    each BLOCK_K step (BLOCK_K divides GROUP_K) is scaled as it is added, and PARTIAL
    sums are already scaled. Group-major scales (row stride 1) make each step's two
    scale loads coalesced."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    ACC: tl.constexpr = tl.int32 if INT8 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if GROUP_K > 0:
            g = k0 // GROUP_K
            a_s = tl.load(as_ptr + rows * a_scale_stride + g * a_group_stride, mask=mask_m, other=0.0)
            b_s = tl.load(bs_ptr + cols * w_scale_stride + g * w_group_stride, mask=mask_n, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc, out_dtype=ACC)
    mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        out_ptr += pid_s.to(tl.int64) * M * N
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if GROUP_K > 0:
            out = acc
        else:
            a_s = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
            b_s = tl.load(bs_ptr + offs_n * w_scale_stride, mask=mask_n, other=0.0)
            out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w8a8_split_sum_kernel(part_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, numel, N, w_scale_stride,
                           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
                           BLOCK: tl.constexpr):
    """out = (sum over s of part[s], in order, in part's dtype: int32 or float32) *
    a_scale * b_scale (+ bias): the unsplit kernel's epilogue, so for int8 splitting
    changes no bit. SCALED: the parts carry their scales already (block-scaled fp8)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0)
    col = offs % N
    out = acc.to(tl.float32)
    if not SCALED:
        out = (out * tl.load(as_ptr + offs // N, mask=mask, other=0.0)
               * tl.load(bs_ptr + col * w_scale_stride, mask=mask, other=0.0))
    if HAS_BIAS:
        out += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def pick_int8_config(m: int, k: int, n: int) -> I8Config:
    """The int8 kernel's tile for m rows (INT8_CONFIGS), with K split until the grid has
    about TARGET_PROGRAMS programs when the tiles alone leave SMs idle."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return INT8_INTERPRET_CONFIG
    return int8_with_split(next(c for limit, c in INT8_CONFIGS if limit is None or m <= limit), m, k, n)


def int8_with_split(cfg: I8Config, m: int, k: int, n: int) -> I8Config:
    """cfg with K split into up to TARGET_PROGRAMS // tiles parts when its output tiles
    alone would fill fewer than half of TARGET_PROGRAMS."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if tiles >= TARGET_PROGRAMS // 2:
        return cfg
    return cfg._replace(split_k=max(1, min(TARGET_PROGRAMS // tiles, k // cfg.block_k)))


def w8a8_int8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                   w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   out_dtype: torch.dtype = torch.bfloat16,
                   config: Optional[I8Config] = None) -> torch.Tensor:
    """x_q int8 [M, K] with per-token x_scale [M, 1]; w_q int8 [N, K] (nn.Linear's layout,
    as compressed-tensors stores it) with per-channel w_scale [N] (or [N, 1], or one
    value) -> (x_q @ w_q.T) * x_scale * w_scale + bias, [M, N] in out_dtype, accumulated
    exactly in int32, the scales applied in float32 in the kernel's epilogue. CUDA (and
    the Triton interpreter) run the Triton kernel (`config` overrides
    `pick_int8_config`, for tuning); plain CPU uses torch._int_mm and the reference's
    epilogue."""
    m, k = x_q.shape
    n = w_q.shape[0]
    _check_shape("w_q", w_q, (n, k))
    if x_q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return _scale_epilogue(torch._int_mm(x_q, w_q.t()), x_scale, w_scale, bias, out_dtype)
    return _w8a8_triton(x_q, x_scale, w_q, w_scale, bias, out_dtype,
                        config if config is not None else pick_int8_config(m, k, n))


def _w8a8_triton(x_q, x_scale, w_q, w_scale, bias, out_dtype, cfg: I8Config, group_k: int = 0) -> torch.Tensor:
    """The Triton W8A8 kernel on int8 or fp8 operands (see w8a8_int8_gemm / fp8_gemm), or
    with group_k > 0 block-scaled fp8 (fp8_block_gemm: cfg.block_k divides group_k)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    int8 = x_q.dtype == torch.int8
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    a = x_q if x_q.stride(-1) == 1 else x_q.contiguous()
    w = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    if group_k:  # any strides: group-major (row stride 1) loads fastest
        a_s, b_s = x_scale.float(), w_scale.float()
        a_scale_stride, a_group_stride = a_s.stride()
        w_scale_stride, w_group_stride = b_s.stride()
    else:
        a_group_stride = w_group_stride = 0
        a_s = x_scale.reshape(-1).float().expand(m).contiguous()
        b_s = w_scale.reshape(-1).float().contiguous()  # a strided column of block scales, too
        if b_s.numel() not in (1, n):
            raise ValueError(f"w_scale has {b_s.numel()} values; expected {n} (per channel) or 1")
        a_scale_stride, w_scale_stride = 1, 1 if b_s.numel() == n else 0
    split, k_per_split = _k_splits(k, cfg.block_k, cfg.split_k)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.int32 if int8 else torch.float32,
                                                device=x_q.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _w8a8_kernel[grid](
        a, w, a_s, b_s, bias if bias is not None else b_s, target, m, n, k, k_per_split,
        a.stride(0), w.stride(0), n, w_scale_stride, a_scale_stride, w_group_stride, a_group_stride,
        HAS_BIAS=bias is not None,
        PARTIAL=split > 1, INT8=int8, GROUP_K=group_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        block = 1024
        _w8a8_split_sum_kernel[(triton.cdiv(m * n, block),)](
            target, a_s, b_s, bias if bias is not None else b_s, out, m * n, n, w_scale_stride,
            SPLIT_K=split, HAS_BIAS=bias is not None, SCALED=group_k > 0, BLOCK=block)
    return out


def fp8_gemm_ref(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16):
    """Plain PyTorch: dequantize both operands to float32, matmul in float32."""
    x = x_q.float() * x_scale.float().reshape(-1, 1)
    w = w_q.float() * w_scale.float().reshape(-1, 1)
    out = x @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _capability(t: torch.Tensor) -> tuple:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (99, 0)  # CPU: any


def _fp8_triton_ok(x_q: torch.Tensor) -> bool:
    """The Triton kernel can take fp8 operands here: sm89+, or the interpreter on CPU."""
    if x_q.device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return x_q.is_cuda and _capability(x_q) >= (8, 9)


def _scaled_mm_ok(x_q: torch.Tensor, n: int, k: int) -> bool:
    if k % 16 or n % 16 or x_q.device.type not in ("cuda", "cpu"):
        return False
    return _capability(x_q) >= (8, 9)


# Up to this many rows fp8 runs the Triton W8A8 kernel (float32 accumulation) with
# pick_int8_config's tiles (the same operand bytes); above, torch._scaled_mm (cuBLASLt).
# H100, one Llama-3.1-8B layer at M=1: the int8 Triton kernel 1.60x bf16, _scaled_mm 1.12x.
FP8_TRITON_MAX_M = 64


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
             w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
             out_dtype: torch.dtype = torch.bfloat16, config: Optional[I8Config] = None) -> torch.Tensor:
    """x_q float8_e4m3fn [M, K] with per-token x_scale [M, 1] (or one value); w_q
    float8_e4m3fn [N, K] with per-channel w_scale [N] / [N, 1] or a per-tensor one ->
    (x_q * x_scale) @ (w_q * w_scale).T + bias, [M, N] in out_dtype. Up to
    FP8_TRITON_MAX_M rows on sm89+ (and in the Triton interpreter), or whenever `config`
    is given, the Triton W8A8 kernel; otherwise torch._scaled_mm (sm89+ or CPU) with
    row-wise scales for bf16 output on sm90+, else unit scales, a float32 result and the
    scales afterwards. The reference where shapes don't fit."""
    m, k = x_q.shape
    n = w_q.shape[0]
    _check_shape("w_q", w_q, (n, k))
    if config is not None or (m <= FP8_TRITON_MAX_M and _fp8_triton_ok(x_q)):
        return _w8a8_triton(x_q, x_scale, w_q, w_scale, bias, out_dtype,
                            config if config is not None else pick_int8_config(m, k, n))
    if not _scaled_mm_ok(x_q, n, k):
        return fp8_gemm_ref(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if out_dtype == torch.bfloat16 and _capability(x_q) >= (9, 0):  # row-wise: sm90+
        sa = x_scale.float().reshape(-1, 1).expand(m, 1).contiguous()
        sb = w_scale.float().reshape(1, -1).expand(1, n).contiguous()
        out = torch._scaled_mm(x_q, w_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
        return out if bias is None else out + bias.to(out_dtype)
    one = torch.ones((), dtype=torch.float32, device=x_q.device)
    acc = torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return _scale_epilogue(acc, x_scale, w_scale, bias, out_dtype)


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """q [..., K] with one scale per `group` consecutive channels, scales [..., ceil(K /
    group)] (a last partial group has its own) -> float32 [..., K]."""
    return q.float() * scales.float().repeat_interleave(group, dim=-1)[..., :q.shape[-1]]


def fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, group_k: int, bias=None, out_dtype=torch.bfloat16):
    """Plain PyTorch: both operands dequantized to float32 with their per-group scales
    (x_scale [M, K / group_k], w_scale [N, K / group_k]), matmul in float32."""
    out = dequantize_groups(x_q, x_scale, group_k) @ dequantize_groups(w_q, w_scale, group_k).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# Block-scaled fp8 tiles from 64 rows (int8_tune.py --format fp8-block on an H200,
# 2026-11-27, one Llama-3.1-8B layer's four GEMMs without the activation quantization:
# 90.6 / 337.5 / 2758 us at M = 64 / 512 / 4096, against 97.2 / 420.3 / 2826 with the
# int8 tiles and bf16 cuBLAS's 126.9 / 299.0 / 2313); below 64 rows the int8 tiles.
FP8_BLOCK_CONFIGS = (
    (32, None),
    (64, I8Config(64, 128, 128, 1, 1, 8, 3)),
    (1024, I8Config(64, 128, 128, 1, 8, 8, 3)),
    (None, I8Config(128, 128, 128, 1, 8, 8, 3)),
)


def fp8_block_config(m: int, k: int, n: int, group_k: int) -> I8Config:
    """The block-scaled tile for m rows (FP8_BLOCK_CONFIGS, else pick_int8_config's),
    with BLOCK_K cut to divide group_k (each K step has one scale per row) and K split as
    int8_with_split splits it."""
    tuned = next(c for limit, c in FP8_BLOCK_CONFIGS if limit is None or m <= limit)
    if tuned is not None and os.environ.get("TRITON_INTERPRET") != "1":
        cfg = int8_with_split(tuned, m, k, n)
    else:
        cfg = pick_int8_config(m, k, n)
    block_k = min(cfg.block_k, group_k & -group_k)  # the largest power of two dividing group_k
    if block_k < 16:
        raise ValueError(f"group_k is {group_k}; the block-scaled fp8 kernel needs a multiple of 16")
    if block_k == cfg.block_k:
        return cfg
    return int8_with_split(cfg._replace(block_k=block_k, split_k=1), m, k, n)


def fp8_block_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                   w_scale: torch.Tensor, group_k: int, bias: Optional[torch.Tensor] = None,
                   out_dtype: torch.dtype = torch.bfloat16, config: Optional[I8Config] = None,
                   w_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-scaled fp8 (HF fp8 / DeepSeek-V3 checkpoints): x_q float8_e4m3fn [M, K] with
    one scale per token per group_k channels, x_scale [M, K / group_k]; w_q [N, K] with
    w_scale [N, K / group_k] (the block scales expanded over rows) -> sum over groups g of
    (x_q[:, g] @ w_q[:, g].T) * x_scale[:, g] * w_scale[:, g] (+ bias), [M, N], float32
    accumulation. One Triton kernel (CUDA sm89+ or the interpreter), K a multiple of
    group_k; the reference elsewhere. The scales may have any strides; group-major ones
    (`per_token_quant_fp8(..., group_major=True)`, a [G, N] buffer viewed as [N, G]) are
    read coalesced. With `w_blocks` (block_scales_for_cublas of the same scales), from
    FP8_BLOCK_CUBLAS_MIN_M rows the product runs through cuBLAS (fp8_block_scaled_mm)
    where it can."""
    m, k = x_q.shape
    n = w_q.shape[0]
    if (w_blocks is not None and config is None and m >= FP8_BLOCK_CUBLAS_MIN_M
            and block_scaled_mm_ok(x_q, k, n, group_k)):
        return fp8_block_scaled_mm(x_q, x_scale, w_q, w_blocks, bias, out_dtype)
    _check_shape("w_q", w_q, (n, k))
    if k % group_k:
        raise ValueError(f"K is {k}; fp8_block_gemm needs a multiple of group_k {group_k}")
    _check_shape("x_scale", x_scale, (m, k // group_k))
    _check_shape("w_scale", w_scale, (n, k // group_k))
    if not _fp8_triton_ok(x_q):
        return fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, group_k, bias, out_dtype)
    cfg = config if config is not None else fp8_block_config(m, k, n, group_k)
    if group_k % cfg.block_k:
        raise ValueError(f"config.block_k {cfg.block_k} does not divide group_k {group_k}")
    return _w8a8_triton(x_q, x_scale, w_q, w_scale, bias, out_dtype, cfg, group_k=group_k)


# ---------------------------------------------------------------- block-scaled fp8 through cuBLAS

# From this many rows HF fp8 block checkpoints run cuBLAS's block-scaled GEMM instead of
# fp8_block_gemm's Triton kernel. One H200, one Llama-3.1-8B layer, same call (2026-11-27):
# cuBLAS 118 / 119 / 144 / 211 / 1769 us at M = 64 / 128 / 256 / 512 / 4096, the Triton
# kernel 102 / 137 / 218 / 376 / 2910, bf16 cuBLAS 132 / 141 / 182 / 300 / 2584.
FP8_BLOCK_CUBLAS_MIN_M = 128


def block_scales_for_cublas(w_scale_rows: torch.Tensor, group_n: int = 128) -> torch.Tensor:
    """The [N, G] row-expanded block scales (fp8_block_gemm's w_scale) -> the [G, N / 128]
    view cuBLAS's 128x128 weight scaling reads (torch._scaled_mm): one row of blocks per 128
    output rows, stored block-row-major with rows padded to a multiple of 4 and viewed
    transposed (PyTorch's own block-wise tests lay it out so; torch 2.11 refuses the padded
    shape and, on the H200, a [2, 2] view with stride (1, 2) gave wrong products)."""
    n, g = w_scale_rows.shape
    if group_n != 128 or n % 128:
        raise ValueError(f"N is {n} with {group_n}-row blocks; cuBLAS's block scaling needs 128-row blocks "
                         f"and N a multiple of 128")
    blocks = w_scale_rows[::128].float()
    compact = torch.zeros(n // 128, -(-g // 4) * 4, dtype=torch.float32, device=blocks.device)
    compact[:, :g] = blocks
    return compact.t()[:g]


_BLOCK_SCALED_MM = {}


def block_scaled_mm_ok(x_q: torch.Tensor, k: int, n: int, group_k: int) -> bool:
    """Whether torch._scaled_mm runs the DeepSeek recipe (1x128 activation and 128x128
    weight scales) here: CUDA sm90 (cuBLAS 12.9+), 128-wide groups, N a multiple of 128 and
    K of 512 (whole groups of 4 blocks: the only case checked on a GPU). Probed once per
    device with a small product."""
    if x_q.device.type != "cuda" or group_k != 128 or k % 512 or n % 128 or _capability(x_q) != (9, 0):
        return False
    key = x_q.device.index
    if key not in _BLOCK_SCALED_MM:
        try:
            a = torch.zeros(4, 512, device=x_q.device).to(torch.float8_e4m3fn)
            a_s = torch.ones(4, 4, device=x_q.device).t()
            b = torch.zeros(128, 512, device=x_q.device).to(torch.float8_e4m3fn)
            b_s = block_scales_for_cublas(torch.ones(128, 4, device=x_q.device))
            torch._scaled_mm(a, b.t(), scale_a=a_s, scale_b=b_s, out_dtype=torch.bfloat16)
            _BLOCK_SCALED_MM[key] = True
        except (RuntimeError, NotImplementedError, ValueError):
            _BLOCK_SCALED_MM[key] = False
    return _BLOCK_SCALED_MM[key]


def fp8_block_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_blocks: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8_block_gemm's product through cuBLAS (torch._scaled_mm, 1x128 x 128x128 scaling):
    x_q [M, K] with x_scale [M, K / 128] group-major (per_token_quant_fp8(..., 128,
    group_major=True)), w_q [N, K], w_blocks from block_scales_for_cublas. M is padded to a
    multiple of 4 (cuBLASLt) when it is not one. Where cuBLAS cannot (block_scaled_mm_ok),
    the blocks are expanded back over rows for fp8_block_gemm."""
    m, k = x_q.shape
    n = w_q.shape[0]
    g = k // 128
    _check_shape("w_blocks", w_blocks, (g, n // 128))
    if not block_scaled_mm_ok(x_q, k, n, 128):
        rows = w_blocks.t().repeat_interleave(128, 0)
        return fp8_block_gemm(x_q, x_scale, w_q, rows, 128, bias, out_dtype)
    pad = -m % 4
    if pad:
        x_q = torch.cat([x_q, x_q.new_zeros(pad, k)])
        x_scale = torch.cat([x_scale.t(), x_scale.new_ones(x_scale.shape[1], pad)], dim=1).t()
    elif x_scale.stride(0) != 1:
        x_scale = x_scale.t().contiguous().t()
    out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_blocks, out_dtype=out_dtype)
    out = out[:m] if pad else out
    return out if bias is None else out + bias.to(out_dtype)
