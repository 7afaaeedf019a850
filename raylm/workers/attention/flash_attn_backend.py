"""FlashAttention-4 (package flash-attn-4, module flash_attn.cute, CuTe DSL kernels compiled
on first use) as an attention backend: its varlen forward reads raylm's paged cache
through the block table as `page_table`, for decode and prefill steps alike.

q is packed by sequence (cu_seqlens_q = query_start_loc), each sequence's keys are its
first seq_lens[i] cache positions (seqused_k); causal masking is aligned bottom-right, so
query j of a chunk sees the cached prefix and the new tokens up to j. On SM90 (H100,
H200) FA4 has no split-KV (one program per query tile and head, however long the
context) and reads pages by TMA only when block_size equals its key tile (128); other
block sizes take a slower gather path. It reads no fp8 KV cache next to bf16 queries.
"""
from __future__ import annotations

from typing import Optional

import torch

from raylm.kernels.attention.kv_cache import write_kv_cache
from raylm.workers.attention_backends import (AttentionBackend, AttentionMetadata,
                                              AttentionShape, require)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class FlashAttnBackend(AttentionBackend):
    """FA4's flash_attn_varlen_func with page_table (see the module docstring). Its launch
    reads only tensors and host bounds fixed per captured size, so decode and one-sequence
    prefill graphs capture it."""

    name = "flash_attn"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = False

    def __init__(self):
        super().__init__()
        interface = require("flash_attn.cute.interface", "flash-attn-4", self.name)
        self._varlen = interface.flash_attn_varlen_func

    def refusal(self, op: str, shape: AttentionShape) -> Optional[str]:
        if shape.device.type != "cuda":
            return "FlashAttention-4 runs on CUDA devices only"
        major = _capability(shape.device)[0]
        if major not in (9, 10, 11):
            return f"FlashAttention-4 reads a paged KV cache on SM90 and SM100 only, not SM{major}x"
        if shape.q_dtype not in (torch.float16, torch.bfloat16):
            return "FlashAttention-4 takes float16 or bfloat16 queries"
        if shape.kv_dtype != shape.q_dtype:
            return "FlashAttention-4 needs the KV cache in the query's dtype (no fp8 KV cache)"
        d = shape.head_dim
        fits = 8 <= d <= 256 if major == 9 else (8 <= d <= 128 or d == 256)
        if d % 8 or not fits:
            return "head_dim must be a multiple of 8 from 8 to 256 on SM90 (to 128, or 256, on SM100)"
        if shape.num_heads % shape.num_kv_heads:
            return "num_heads must be a multiple of num_kv_heads"
        return None

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_cache(k, v, kv_cache, slot_mapping, k_scale, v_scale)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        self.check(meta.op, q, kv_cache)
        out = self._varlen(q, kv_cache[0], kv_cache[1], cu_seqlens_q=meta.query_start_loc,
                           seqused_k=meta.seq_lens, page_table=meta.block_tables,
                           max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len,
                           softmax_scale=scale, causal=True, num_splits=0)
        return out[0] if isinstance(out, tuple) else out
