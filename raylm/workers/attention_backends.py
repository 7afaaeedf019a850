"""Attention backends beyond the PyTorch reference: our Triton kernels ("triton", the
default on CUDA) and, when their packages are installed, flash-attn ("flash_attn") and
FlashInfer ("flashinfer"). Importing this module registers all three; a backend whose
package is missing fails when it is constructed, naming the package."""
from __future__ import annotations

import importlib
from itertools import accumulate

import torch
import torch.nn.functional as F

from raylm.kernels.decode_attention import decode_num_splits, paged_decode_attention
from raylm.kernels.kv_cache import write_kv_cache
from raylm.kernels.prefill_attention import paged_prefill_attention
from raylm.workers.layers.attention import AttentionBackend, AttentionMetadata, register_backend


def default_backend(device: str) -> str:
    """The attention backend to use when none is asked for: Triton kernels on CUDA, the
    PyTorch reference elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def _require(module: str, package: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"attention_backend {backend!r} needs the {package} package, "
                          f"which is not installed") from e


class TritonAttentionBackend(AttentionBackend):
    """Our Triton kernels: split-K paged decode for decode-only steps, the varlen paged
    prefill kernel for any step with a query longer than one token. The decode launch
    depends only on tensors and the batch shape, so it can be captured in a CUDA graph."""

    name = "triton"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = True

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


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2 reading the paged cache through the block table. Its paged KV cache
    needs block_size to be a multiple of 256."""

    name = "flash_attn"

    def __init__(self):
        fa = _require("flash_attn", "flash-attn", self.name)
        self._varlen = fa.flash_attn_varlen_func
        self._with_kvcache = fa.flash_attn_with_kvcache

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_cache(k, v, kv_cache, slot_mapping)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        block_size = kv_cache.shape[2]
        if block_size % 256:
            raise ValueError(f"attention_backend 'flash_attn' needs block_size to be a multiple "
                             f"of 256 (flash-attn's paged KV cache); block_size is {block_size}")
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, Hk, D] each
        if meta.max_query_len == 1:
            out = self._with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                     block_table=meta.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        cu_seqlens_k = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        # flash-attn aligns the causal mask bottom-right: query j sees the cached prefix.
        return self._varlen(q, k_cache, v_cache, meta.query_start_loc, cu_seqlens_k,
                            meta.max_query_len, meta.max_seq_len, softmax_scale=scale,
                            causal=True, block_table=meta.block_tables)


class FlashInferBackend(AttentionBackend):
    """FlashInfer's paged prefill / decode wrappers over the cache's (K, V) halves in NHD
    layout. The plan is made once per step (the first layer) and reused by the others."""

    name = "flashinfer"
    workspace_bytes = 128 << 20

    def __init__(self):
        self._fi = _require("flashinfer", "flashinfer-python", self.name)
        self._workspace = None
        self._planned = None  # (meta, plan key) of the current step
        self._wrapper = None

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_cache(k, v, kv_cache, slot_mapping)

    def _plan(self, q, kv_cache, meta: AttentionMetadata, scale) -> None:
        key = (q.dtype, q.shape[1], tuple(kv_cache.shape[2:]), scale)
        if self._planned is not None and self._planned[0] is meta and self._planned[1] == key:
            return
        if self._workspace is None:
            self._workspace = torch.zeros(self.workspace_bytes, dtype=torch.uint8, device=q.device)
            self._prefill = self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
            self._decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")
        block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
        num_pages = [-(-n // block_size) for n in meta.seq_lens_cpu]
        kv_indptr = torch.tensor([0, *accumulate(num_pages)], dtype=torch.int32)
        last_page_len = torch.tensor([n - (p - 1) * block_size for n, p in zip(meta.seq_lens_cpu, num_pages)],
                                     dtype=torch.int32)
        in_use = (torch.arange(meta.block_tables.shape[1], device=q.device)[None, :]
                  < torch.tensor(num_pages, device=q.device)[:, None])
        kv_indices = meta.block_tables[in_use]
        common = dict(sm_scale=scale, q_data_type=q.dtype, kv_data_type=kv_cache.dtype)
        if meta.max_query_len == 1:
            self._decode.plan(kv_indptr, kv_indices, last_page_len, q.shape[1], num_kv_heads,
                              head_dim, block_size, **common)
            self._wrapper = self._decode
        else:
            qo_indptr = torch.tensor([0, *accumulate(meta.query_lens_cpu)], dtype=torch.int32)
            self._prefill.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, q.shape[1],
                               num_kv_heads, head_dim, block_size, causal=True, **common)
            self._wrapper = self._prefill
        self._planned = (meta, key)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        self._plan(q, kv_cache, meta, scale)
        return self._wrapper.run(q, (kv_cache[0], kv_cache[1]))


register_backend(TritonAttentionBackend.name, TritonAttentionBackend)
register_backend(FlashAttnBackend.name, FlashAttnBackend)
register_backend(FlashInferBackend.name, FlashInferBackend)
