"""FlashAttention-4 (package flash-attn-4, module flash_attn.cute, CuTe DSL kernels compiled
on first use) as an attention backend: its varlen forward reads raylm's paged cache
through the block table as `page_table`, for decode and prefill steps alike.

q is packed by sequence (cu_seqlens_q = query_start_loc), each sequence's keys are its
first seq_lens[i] cache positions (seqused_k); causal masking is aligned bottom-right, so
query j of a chunk sees the cached prefix and the new tokens up to j. On SM90 (H100,
H200) FA4 has no split-KV (one program per query tile and head, however long the
context) and reads pages by TMA only when block_size equals its key tile (128 for
head_dim up to 192; 80 at 256, so never there); other block sizes take a slower gather path, which needs head_dim a multiple of 16 ("Paged KV
does not support irregular head dim", flash_fwd_sm90.py; validate_fwd_config on SM100).
It reads no fp8 KV cache next to bf16 queries (q, k and v must share a dtype; fp8 is
SM100-only). The call returns (out, lse), lse None unless return_lse.
"""
from __future__ import annotations

from typing import Optional

import torch

from raylm.kernels.attention.kv_cache import write_kv_cache
from raylm.workers.attention_backends import (AttentionBackend, AttentionMetadata,
                                              AttentionShape, require)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def paged_refusal(major: int, shape: AttentionShape) -> Optional[str]:
    """Why FA4's varlen forward cannot read raylm's paged cache at `shape` on an SM{major}x
    GPU (flash_attn/cute/interface.py _flash_attn_fwd, _validate_head_dims, config.py
    validate_fwd_config); None if it can."""
    if major not in (9, 10, 11):
        return f"FlashAttention-4 reads a paged KV cache on SM90 and SM100 only, not SM{major}x"
    if shape.q_dtype not in (torch.float16, torch.bfloat16):
        return "FlashAttention-4 takes float16 or bfloat16 queries"
    if shape.kv_dtype != shape.q_dtype:
        return "FlashAttention-4 needs the KV cache in the query's dtype (no fp8 KV cache)"
    d = shape.head_dim
    fits = 16 <= d <= 256 if major == 9 else (16 <= d <= 128 or d == 256)
    if d % 16 or not fits:
        # Multiples of 8 only where pages load by TMA (block_size equal to the key tile);
        # raylm's block sizes mostly take the gather path, so ask for 16 throughout.
        return ("head_dim must be a multiple of 16 from 16 to 256 on SM90 (to 128, or 256, on "
                "SM100) to read a paged KV cache")
    if shape.num_heads % shape.num_kv_heads:
        return "num_heads must be a multiple of num_kv_heads"
    return None


class FlashAttnBackend(AttentionBackend):
    """FA4's flash_attn_varlen_func with page_table (see the module docstring). Its launch
    reads only tensors and host bounds fixed per captured size, so decode and one-sequence
    prefill graphs capture it."""

    name = "flash_attn"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = False
    triton_kv_write = True

    def __init__(self):
        super().__init__()
        interface = require("flash_attn.cute.interface", "flash-attn-4", self.name)
        self._varlen = interface.flash_attn_varlen_func

    def refusal(self, op: str, shape: AttentionShape) -> Optional[str]:
        if shape.device.type != "cuda":
            return "FlashAttention-4 runs on CUDA devices only"
        return paged_refusal(_capability(shape.device)[0], shape)

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_cache(k, v, kv_cache, slot_mapping, k_scale, v_scale)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        self.check(meta.op, q, kv_cache)
        out = self._varlen(q, kv_cache[0], kv_cache[1], cu_seqlens_q=meta.query_start_loc,
                           seqused_k=meta.seq_lens, page_table=meta.block_tables,
                           max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len,
                           softmax_scale=scale, causal=True, num_splits=0)
        return out[0] if isinstance(out, tuple) else out
