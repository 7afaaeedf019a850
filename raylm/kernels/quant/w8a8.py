"""W8A8: int8 x int8 (and fp8 x fp8 at small M) as a Triton kernel with the scales in
its epilogue, fp8 at larger M through torch._scaled_mm (cuBLASLt); each with its plain
PyTorch reference (dequantize, then matmul), which is also the CPU path."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from raylm.kernels.quant.pack import _check_shape
from raylm.kernels.quant.w4a16 import TARGET_PROGRAMS, _k_splits


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

