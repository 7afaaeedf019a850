"""Paged attention for decode steps: one query token per sequence, attending to its
whole cached context (causal is implicit: the query is the newest token).

Flash-decoding: the context of each sequence is cut into `num_splits` ranges of whole
BLOCK_N tiles; one program per (sequence, kv head, split) computes a partial softmax
for all query heads of that kv head (GQA: the K/V tile is loaded once per group), and
a second kernel merges the splits by their log-sum-exp. `num_splits` is a Python int
fixed for a given batch size, so the launch is CUDA-graph friendly: sequences whose
context is short simply leave their later splits empty.

KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_dim]. An fp8 cache
(float8_e4m3fn) holds K / k_scale and V / v_scale: tiles are loaded as fp8 and converted
to q's dtype (exact), k_scale is folded into the softmax scale and v_scale into the output.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32


# The split count is a run-time argument, not a constant, and neither it nor the
# log-sum-exp strides that follow from it are specialized on (Triton compiles a variant per
# value 1 and per divisibility by 16): one compiled kernel serves every batch size, where a
# variant per split count cost seconds of compiling while the decode graphs were captured
# at start-up. The partial outputs' strides stay specialized: they are multiples of
# head_dim for any split count, so they make no variants and keep the accesses vectorized.
_SPLIT_ARGS = ["num_splits", "stride_ls", "stride_lh"]


@triton.jit(do_not_specialize=_SPLIT_ARGS)
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr,
    scale_log2, v_scale,
    stride_qs, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    stride_ms, stride_mh, stride_mk,
    stride_ls, stride_lh,
    num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Each split takes a whole number of tiles; trailing splits may be empty.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_h
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM

    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        mask_n = tok < end
        block = tl.load(table + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_off = block * stride_cb + (tok % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * scale_log2
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        # Every tile holds at least one valid token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty split reports lse = -inf and writes no partial output (the merge reads none).
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if start < end:
        o = acc * (v_scale / l_i)[:, None]
        mid = mid_o_ptr + seq * stride_ms + heads[:, None] * stride_mh + split * stride_mk + offs_d[None, :]
        tl.store(mid, o, mask=mask_h[:, None] & mask_d[None, :])
    tl.store(mid_lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit(do_not_specialize=_SPLIT_ARGS)
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_ms, stride_mh, stride_mk,
    stride_ls, stride_lh,
    stride_os, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(mid_lse_ptr + seq * stride_ls + head * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty sequence (padding) gives zeros
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    # Only the splits that attended anything wrote a partial output: the trailing splits of a
    # context shorter than the split count's tiles are empty.
    filled = mask_s & (lse > float("-inf"))
    o = tl.load(mid_o_ptr + seq * stride_ms + head * stride_mh + offs_s[:, None] * stride_mk
                + offs_d[None, :], mask=filled[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.maximum(denom, 1e-30)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a nominal few, so tests still exercise split-K


def decode_num_splits(num_seqs: int, num_kv_heads: int, device, waves: float = 2,
                      max_splits: int = MAX_SPLITS) -> int:
    """Splits per sequence so that (seqs x kv heads x splits) programs fill the GPU about
    `waves` times, at most `max_splits`; depends only on the batch shape, so it is fixed for
    a captured graph."""
    want = math.ceil(waves * _num_sms(torch.device(device)) / max(1, num_seqs * num_kv_heads))
    return max(1, min(max_splits, triton.next_power_of_2(want)))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           block_n: int | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0, num_warps: int = 4,
                           num_stages: int = 3) -> torch.Tensor:
    """q [num_seqs, Hq, D]; kv_cache [2, num_blocks, block_size, Hk, D] (q's dtype, or fp8
    holding K / k_scale and V / v_scale); block_tables [num_seqs, max_blocks] int32;
    seq_lens [num_seqs] int32 (0 marks a padding row, whose output is zeros) -> out
    [num_seqs, Hq, D] in q's dtype, accumulated in float32."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, q.device)
    block_d = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    mid_o = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                        device=q.device)
    mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse,
        scale * math.log2(math.e) * k_scale, float(v_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_SIZE=block_size,
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_reduce_kernel[(num_seqs, num_heads)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        # At least 16 wide, so the common split counts (1 to 16) share one compiled merge.
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(16, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    return out


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                               v_scale: float = 1.0) -> torch.Tensor:
    """Plain PyTorch: gather each sequence's K/V through its block table, dequantize
    (times k_scale / v_scale) and softmax in float32. A sequence of length 0 gives zeros."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_tables[i, :-(-seq_len // block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float() * k_scale
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float() * v_scale
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", q[i].float(), k) * scale
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
