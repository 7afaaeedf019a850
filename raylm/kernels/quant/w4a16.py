"""W4A16: weight-only 4/8-bit GPTQ- and AWQ-packed matmuls (see pack.py for the layouts)
as a Triton kernel that dequantizes tiles on the fly, and from DEQUANT_MIN_M rows a
dequantizing kernel followed by a dense matmul; w4a16_gemm_ref is the PyTorch reference."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from raylm.kernels.quant.pack import (_check_bits, _check_layout, _check_shape,
                                      dequantize_awq, dequantize_gptq)


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

