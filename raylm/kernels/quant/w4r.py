"""W4A16 in the "w4r" layout: 4-bit weights repacked once at load for the GPU kernel
below, with dequantize_w4r its PyTorch reference."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from raylm.kernels.quant.pack import _check_shape, unpack_rows
from raylm.kernels.quant.w4a16 import (TARGET_PROGRAMS, W4Config, _check_config, _k_splits,  # noqa: F401
                                       _split_k_sum_kernel, with_split)

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

