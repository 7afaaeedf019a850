"""Paged attention for prefill and mixed steps: variable-length packed queries, each
attending causally to its sequence's cached prefix plus the new tokens (which are
already in the cache). Covers chunked prefill, prefix-cache hits and decode rows mixed
into the same step.

One program handles BLOCK_Q consecutive query tokens of one sequence times the GROUP
query heads sharing one kv head (BLOCK_M = BLOCK_Q * GROUP_PAD rows), so each K/V tile
is loaded once per group. The grid is (num_kv_heads, num_tokens // BLOCK_Q + num_seqs),
the second an upper bound on the q blocks of all sequences known from shapes alone; each
program finds its sequence by binary search over query_start_loc. The q blocks run last
first (the longest causal programs first), and only the tiles that reach a row's own
position or the end of the keys compute a mask.

KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_dim]. An fp8 cache
(float8_e4m3fn) holds K / k_scale and V / v_scale: tiles are loaded as fp8 and converted
to q's dtype (exact), k_scale is folded into the softmax scale and v_scale into the output.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


MAX_GRID_Y = 65535  # CUDA's bound on a grid's second axis


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning global q block `q_block`: sequence i owns the blocks from
    query_start_loc[i] // BLOCK_Q + i on."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, n0, kv_end, q_pos, scale_log2,
                 kv_head, offs_n, offs_d, mask_d, stride_cb, stride_ct, stride_ch,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """One K/V tile (keys n0 + offs_n) folded into the running softmax of every row.
    MASKED: the tile may hold keys past kv_end or past a row's position; otherwise every
    key of the tile is visible to every row and no mask is computed."""
    tok = n0 + offs_n
    if MASKED:
        mask_n = tok < kv_end
        block = tl.load(table + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
    else:
        block = tl.load(table + tok // BLOCK_SIZE).to(tl.int64)
        kv_mask = mask_d[None, :]
    kv_off = block * stride_cb + (tok % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    kv_ptrs = kv_off[:, None] + offs_d[None, :]
    if MASKED or not EVEN_D:
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + kv_ptrs).to(q.dtype)
    qk = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        visible = mask_n[None, :] & (tok[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED or not EVEN_D:
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    else:
        v = tl.load(v_cache_ptr + kv_ptrs).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2, v_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    # The last q blocks first: in a causal prompt they see the most keys, so the longest
    # programs start first and the short ones fill the tail. The grid puts the kv heads on
    # its first axis (every head of a q block before the next block) unless the q blocks
    # are more than CUDA allows on its second (65,535).
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        kv_head = tl.program_id(1)
        q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q_idx = local_block * BLOCK_Q + offs_m // GROUP_PAD  # token within this step's chunk
    in_group = offs_m % GROUP_PAD
    heads = kv_head * GROUP + in_group
    mask_m = (q_idx < q_len) & (in_group < GROUP)
    mask_d = offs_d < HEAD_DIM
    # Padding rows keep a position >= 0, so key 0 is visible to every row (no NaNs).
    q_pos = context_len + q_idx

    tok_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    # Keys up to the last query of this block: the cached prefix plus the causal part.
    kv_end = tl.minimum(seq_len, context_len + (local_block + 1) * BLOCK_Q)
    # Whole tiles before the block's first query are visible to every row: no masks. The
    # tiles after (at most a tile more than the block's own queries) are masked; the first
    # of them starts at or before every row's position, so no row is left without a key.
    full_end = ((context_len + local_block * BLOCK_Q) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, n0, kv_end, q_pos,
                                     scale_log2, kv_head, offs_n, offs_d, mask_d, stride_cb, stride_ct,
                                     stride_ch, BLOCK_SIZE, False, EVEN_D)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, n0, kv_end, q_pos,
                                     scale_log2, kv_head, offs_n, offs_d, mask_d, stride_cb, stride_ct,
                                     stride_ch, BLOCK_SIZE, True, EVEN_D)

    out = acc * (v_scale / l_i)[:, None]
    tl.store(out_ptr + tok_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                            max_query_len: int, block_m: int | None = None,
                            block_n: int | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """q [num_tokens, Hq, D] packed by sequence (sequence i's rows are
    query_start_loc[i]:query_start_loc[i+1]); kv_cache [2, num_blocks, block_size, Hk, D]
    already holding the new tokens (q's dtype, or fp8 holding K / k_scale and V / v_scale);
    block_tables [num_seqs, max_blocks] int32; seq_lens [num_seqs] int32 (cached + new).
    Query j of a sequence sits at position seq_len - q_len + j and sees keys up to it.
    -> out [num_tokens, Hq, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(head_dim)
    if block_m is None:
        # Small tiles when every sequence brings a handful of tokens (decode rows).
        block_m = 16 if max_query_len * group_pad <= 16 else 64
    block_m = max(block_m, group_pad, 16)
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    block_q = block_m // group_pad
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_warps is None:
        num_warps = 8 if block_d >= 256 else 4
    if num_stages is None:
        num_stages = 2
    q_blocks = num_tokens // block_q + num_seqs
    heads_first = q_blocks <= MAX_GRID_Y
    grid = (num_kv_heads, q_blocks) if heads_first else (q_blocks, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, seq_lens, query_start_loc,
        scale * math.log2(math.e) * k_scale, float(v_scale), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEADS_FIRST=heads_first,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, k_scale: float = 1.0,
                                v_scale: float = 1.0) -> torch.Tensor:
    """Plain PyTorch: per sequence, gather K/V through the block table, dequantize (times
    k_scale / v_scale) and softmax in float32 with a causal mask offset by the cached prefix."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        blocks = block_tables[i, :-(-seq_len // block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float() * k_scale
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float() * v_scale
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        q_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
