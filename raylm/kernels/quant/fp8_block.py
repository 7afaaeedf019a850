"""Block-scaled fp8 (HF fp8 / DeepSeek-V3 checkpoints: one scale per 128 channels of a
token, one per 128x128 weight block): the W8A8 Triton kernel with per-group scales, and
cuBLAS's block-scaled GEMM from FP8_BLOCK_CUBLAS_MIN_M rows; fp8_block_gemm_ref is the
PyTorch reference."""
from __future__ import annotations

import os
from typing import Optional

import torch

from raylm.kernels.quant.pack import _check_shape
from raylm.kernels.quant.w8a8 import (I8Config, _capability, _fp8_triton_ok, _w8a8_triton,
                                      int8_with_split, pick_int8_config)


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
