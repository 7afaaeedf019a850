"""Our Triton kernels as an attention backend (the default on CUDA)."""
from __future__ import annotations

from raylm.kernels.attention.decode import decode_num_splits, paged_decode_attention
from raylm.kernels.attention.kv_cache import write_kv_cache
from raylm.kernels.attention.prefill import paged_prefill_attention
from raylm.workers.attention_backends import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    """Split-K paged decode for decode-only steps, the varlen paged prefill kernel for any
    step with a query longer than one token. The decode launch depends only on tensors
    and the batch shape, so it can be captured in a CUDA graph."""

    name = "triton"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = True
    triton_kv_write = True

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_cache(k, v, kv_cache, slot_mapping, k_scale, v_scale)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        if meta.max_query_len == 1:
            num_splits = decode_num_splits(q.shape[0], kv_cache.shape[3], q.device)
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                          num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
        return paged_prefill_attention(q, kv_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale, meta.max_query_len,
                                       k_scale=k_scale, v_scale=v_scale)
