"""Write new tokens' K and V into the paged KV cache by slot_mapping.

KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_dim]; slot s is block
s // block_size, offset s % block_size. A negative slot (a padding token) is skipped.

An fp8 cache (float8_e4m3fn, kv_cache_dtype="fp8") stores clamp(x / scale, +-448) rounded
to e4m3, one float scale per layer for K and one for V; readers multiply by the scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from raylm.kernels import rotary
from raylm.kernels.quant import act as quant_act

FP8_MAX = quant_act.FP8_MAX  # largest float8_e4m3fn value


@triton.jit
def _to_e4m3_grid(x, scale, FP8_MAX: tl.constexpr):
    """clamp(x / scale, +-FP8_MAX) rounded to the e4m3 grid in float32: the cast to fp8 is
    then exact, compiled or in the interpreter (whose float32 -> fp8 cast rounds wrongly).
    _round_to_e4m3 is looked up through its module so use_interpreter()'s reload is seen."""
    x = tl.math.div_rn(x.to(tl.float32), scale)
    return quant_act._round_to_e4m3(tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX))


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch, k_scale, v_scale,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    row = t.to(tl.int64)
    k = tl.load(k_ptr + row * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + row * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8:
        k = _to_e4m3_grid(k, k_scale, FP8_MAX)
        v = _to_e4m3_grid(v, v_scale, FP8_MAX)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v [num_tokens, Hk, D] (rows may be strided views of a fused qkv) ->
    kv_cache[0 / 1] at each token's slot, in place. An fp8 cache stores k / k_scale and
    v / v_scale (saturated, round to nearest even); other dtypes ignore the scales."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and kv_cache.shape[-2:] == (num_kv_heads, head_dim)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale),
        FP8=kv_cache.dtype == torch.float8_e4m3fn, FP8_MAX=FP8_MAX,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2], num_warps=4,
    )


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_cb, stride_ct, stride_ch, k_scale, v_scale,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = rotary._cos_sin(positions_ptr, t, cos_ptr, sin_ptr, stride_cos, stride_sin, HALF, BLOCK_HALF)
    rotary._rotate(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, BLOCK_HQ, HALF, BLOCK_HALF)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_HK)
        offs_d = tl.arange(0, BLOCK_HALF)
        mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HALF)[None, :]
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct \
            + offs_h[:, None] * stride_ch + offs_d[None, :]
        k_src = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        v_src = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        k1 = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_src + HALF, mask=mask, other=0.0).to(tl.float32)
        # Rounded to k's dtype as the unfused rotary stores it, then written as write_kv does.
        r1 = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
        r2 = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
        v1 = tl.load(v_src, mask=mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mask, other=0.0)
        if FP8:
            r1, r2 = _to_e4m3_grid(r1, k_scale, FP8_MAX), _to_e4m3_grid(r2, k_scale, FP8_MAX)
            v1, v2 = _to_e4m3_grid(v1, v_scale, FP8_MAX), _to_e4m3_grid(v2, v_scale, FP8_MAX)
        tl.store(k_cache_ptr + dst, r1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_write_kv_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """The rotary embedding and the KV-cache write as one launch: q [T, Hq, D] rotated in
    place (raylm.kernels.rotary's layout and caches), k [T, Hk, D] rotated on its way into
    kv_cache[0] with v into kv_cache[1] at each token's slot, as write_kv_cache stores
    them. k itself is left as it was (attention reads the cache)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert v.shape == k.shape and k.shape[2] == head_dim and head_dim % 2 == 0
    assert kv_cache.shape[-2:] == (num_kv_heads, head_dim)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    assert cos_cache.stride(-1) == 1 and sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale),
        FP8=kv_cache.dtype == torch.float8_e4m3fn, FP8_MAX=FP8_MAX,
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_SIZE=kv_cache.shape[2], num_warps=4,
    )


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x in the cache's dtype: for fp8, clamp(x / scale, +-448) cast to e4m3 (in float32)."""
    if dtype == torch.float8_e4m3fn:
        return quant_act._div(x.float(), scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Plain PyTorch: index-put through a flat [num_slots, Hk, D] view."""
    keep = slot_mapping >= 0
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = quantize_kv(k[keep], kv_cache.dtype, k_scale)
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = quantize_kv(v[keep], kv_cache.dtype, v_scale)
