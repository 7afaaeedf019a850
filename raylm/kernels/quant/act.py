"""Dynamic activation quantization, one row (token) or one group of a row per program:
int8 per token for W8A8-int8 checkpoints, fp8 e4m3 per token or per group of channels for
W8A8-fp8 and HF fp8 block checkpoints. Each returns (q, scale) with x ~= q * scale.

int8 conventions (both symmetric, no zero point, float32 math here):
- "vllm": vLLM's dynamic_scaled_int8_quant (csrc/quantization/compressed_tensors/
  int8_quant_kernels.cu): scale = amax / 127, q = cvt.rni.sat(x * (127 / amax)), i.e.
  round half to even, saturate to [-128, 127]; an all-zero row gives q = 0, scale = 0.
  This is how vLLM serves compressed-tensors W8A8-int8 checkpoints.
- "compressed-tensors": the library's own dynamic TOKEN quantization (calculate_qparams
  + _quantize in compressed_tensors/quantization): scale = amax / ((127 - -128) / 2) =
  amax / 127.5, a zero scale replaced by finfo(x.dtype).eps, q = round(clamp(x / scale,
  -128, 127)) with torch.round (half to even). -amax maps to -128, +amax to 127. The
  library computes in x's dtype; here it is float32, so bf16 inputs can differ by one
  step where x / scale lands near a .5 boundary.

fp8 follows vLLM's per_token_group_quant_fp8: scale = max(amax, 1e-10) / 448,
q = clamp(x / scale, -448, 448) cast to float8_e4m3fn (round to nearest even). On the
GPU the cast is the hardware's (cvt.rn.satfinite); Triton's interpreter rounds that cast
wrongly, so there the kernel first rounds to an e4m3 value in float32 (_round_to_e4m3).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

INT8_CONVENTIONS = ("vllm", "compressed-tensors")
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_EPS = 1e-10  # floor on amax, as vLLM's per-token-group fp8 quantization
# Elements per program of the fp8 kernel when groups are small. With one program per
# 128-wide group, quantizing one Llama-3.1-8B layer's activations for block-scaled fp8
# took 505-557 us at M=4096 on an H200 (2026-11-27), against 319 us per token.
FP8_TILE = 4096


@triton.jit
def _round_half_even(v):
    # Exact for |v| < 2**23, and runs the same compiled and in the interpreter (which has
    # no libdevice rint).
    f = tl.floor(v)
    d = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & f_is_odd), f + 1.0, f)


@triton.jit
def _round_to_e4m3(v):
    # Round |v| <= 448 to the nearest e4m3 value (half to even) in float32, so the cast
    # to fp8 that follows is exact; Triton's interpreter rounds that cast wrongly.
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3 subnormals: steps of 2**-9
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    r = _round_half_even(tl.abs(v) / ulp) * ulp
    # Put v's sign bit back (negation would turn -0.0 into +0.0).
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _per_token_quant_int8_kernel(
    x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols, zero_scale,
    COMPRESSED_TENSORS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    if COMPRESSED_TENSORS:
        scale = tl.math.div_rn(amax, 127.5)
        scale = tl.where(scale == 0.0, zero_scale, scale)
        v = tl.math.div_rn(x, scale)
    else:
        scale = tl.math.div_rn(amax, 127.0)
        inv = tl.where(amax > 0.0, tl.math.div_rn(127.0, tl.where(amax > 0.0, amax, 1.0)), 0.0)
        v = x * inv
    q = _round_half_even(tl.minimum(tl.maximum(v, -128.0), 127.0))
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _per_token_quant_fp8_kernel(
    x_ptr, q_ptr, scale_ptr, stride_x, stride_q, stride_s_row, stride_s_group, group_size, num_groups, eps,
    FP8_MAX: tl.constexpr, SOFT_ROUND: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
):
    # One row's BLOCK_G consecutive groups of group_size channels per program, as a
    # [BLOCK_G, BLOCK] tile (one scale per tile row): small groups share a program.
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK)
    cols = groups[:, None] * group_size + j[None, :]
    mask = (groups < num_groups)[:, None] & (j < group_size)[None, :]
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 1), eps), FP8_MAX)
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)
    if SOFT_ROUND:
        v = _round_to_e4m3(v)
    tl.store(q_ptr + row * stride_q + cols, v.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * stride_s_row + groups * stride_s_group, scale, mask=groups < num_groups)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    # IEEE division, as the kernels do: torch turns `cuda_tensor / number` into a
    # multiplication by 1 / number, and `number / tensor` into one by 1 / tensor.
    return a / torch.full_like(a, b)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_convention(convention: str) -> None:
    if convention not in INT8_CONVENTIONS:
        raise ValueError(f"convention is {convention!r}; expected one of {INT8_CONVENTIONS}")


def per_token_quant_int8(x: torch.Tensor, convention: str = "vllm"):
    """x [..., K] (float) -> (q int8 [..., K], scale float32 [..., 1]), symmetric per
    token; `convention` is "vllm" or "compressed-tensors" (see the module docstring)."""
    _check_convention(convention)
    x2 = _rows(x)
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(x2.shape[1])
        _per_token_quant_int8_kernel[(x2.shape[0],)](
            x2, q, scale, x2.stride(0), q.stride(0), x2.shape[1], torch.finfo(x.dtype).eps,
            COMPRESSED_TENSORS=convention == "compressed-tensors", BLOCK=block,
            num_warps=min(16, max(1, block // 256)))
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def per_token_quant_int8_ref(x: torch.Tensor, convention: str = "vllm"):
    """Plain PyTorch, float32 math."""
    _check_convention(convention)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    if convention == "compressed-tensors":
        scale = _div(amax, 127.5)
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
        v = xf / scale
    else:
        scale = _div(amax, 127.0)
        v = xf * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    return torch.round(v.clamp(-128, 127)).to(torch.int8), scale


def _fp8_groups(k: int, group_size: Optional[int]) -> int:
    group_size = k if group_size is None else group_size
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size is {group_size}; it must divide the row length {k}")
    return group_size


def per_token_quant_fp8(x: torch.Tensor, group_size: Optional[int] = None, group_major: bool = False):
    """x [..., K] -> (q float8_e4m3fn [..., K], scale float32 [..., K // group_size]),
    one scale per token (group_size None) or per `group_size` consecutive channels.
    group_major (x 2-D): the scales are stored group by group (a [G, M] buffer, returned
    as its [M, G] transposed view), as the block-scaled GEMM reads them fastest."""
    group_size = _fp8_groups(x.shape[-1], group_size)
    if group_major and x.dim() != 2:
        raise ValueError(f"group_major needs a 2-D x; got shape {tuple(x.shape)}")
    x2 = _rows(x)
    num_groups = x2.shape[1] // group_size
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if group_major:
        scale = torch.empty(num_groups, x2.shape[0], dtype=torch.float32, device=x.device).t()
    else:
        scale = torch.empty(x2.shape[0], num_groups, dtype=torch.float32, device=x.device)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(group_size)
        block_g = max(1, min(triton.next_power_of_2(num_groups), FP8_TILE // block))
        _per_token_quant_fp8_kernel[(x2.shape[0], triton.cdiv(num_groups, block_g))](
            x2, q, scale, x2.stride(0), q.stride(0), scale.stride(0), scale.stride(1), group_size, num_groups,
            FP8_EPS, FP8_MAX=FP8_MAX, SOFT_ROUND=not x.is_cuda, BLOCK_G=block_g, BLOCK=block,
            num_warps=min(16, max(1, block_g * block // 256)))
    if group_major:
        return q, scale
    return q.view(x.shape), scale.view(*x.shape[:-1], num_groups)


def per_token_quant_fp8_ref(x: torch.Tensor, group_size: Optional[int] = None):
    """Plain PyTorch, float32 math."""
    group_size = _fp8_groups(x.shape[-1], group_size)
    xg = x.float().unflatten(-1, (-1, group_size))
    scale = _div(xg.abs().amax(-1, keepdim=True).clamp(min=FP8_EPS), FP8_MAX)
    q = (xg / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale.squeeze(-1)
