"""Rotary position embedding, rotate-half (neox) layout, applied to q and k in place.

cos_cache / sin_cache are [max_position, >= head_dim / 2] float32 (e.g. RotaryEmbedding's
[max_position, head_dim] caches whose two halves repeat); only the first head_dim / 2
columns are read. Plain and llama3-scaled RoPE differ only in these caches."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    p1 = ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(positions_ptr, t, cos_ptr, sin_ptr, stride_cos, stride_sin,
             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token t's cos and sin rows ([1, BLOCK_HALF], float32; zeros past HALF)."""
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, t, cos_ptr, sin_ptr, stride_cos, stride_sin, HALF, BLOCK_HALF)
    _rotate(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, BLOCK_HQ, HALF, BLOCK_HALF)
    _rotate(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, BLOCK_HK, HALF, BLOCK_HALF)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """positions [T]; q [T, Hq, D], k [T, Hk, D] (strided views of a fused qkv are fine)
    rotated in place, in float32."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos_cache.stride(-1) == 1 and sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_cache: torch.Tensor, sin_cache: torch.Tensor):
    """Plain PyTorch, out of place: (rotated q, rotated k), computed in float32."""
    half = q.shape[-1] // 2
    cos = cos_cache[positions, :half].float().unsqueeze(1)
    sin = sin_cache[positions, :half].float().unsqueeze(1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
