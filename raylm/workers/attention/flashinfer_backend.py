"""FlashInfer (flashinfer-python, kernels JIT-compiled on first use) as an attention
backend over raylm's paged cache.

The cache [2, num_blocks, block_size, Hk, D] is handed over as its (K, V) halves in
FlashInfer's NHD layout; a sequence's pages are its block table's first
ceil(seq_len / block_size) entries, flattened into kv_indices (CSR, kv_indptr). Decode
steps run BatchDecodeWithPagedKVCacheWrapper (tensor cores for GQA), prefill and mixed
steps BatchPrefillWithPagedKVCacheWrapper (causal, aligned bottom-right: query j of a
sequence sees its cached prefix and new tokens up to j). Each step is planned once, by
its first layer, from the host-side lengths; kv_indices are gathered on the device from
the block tables, so planning never waits for the GPU. CUDA graphs get one wrapper per
captured size with fixed buffers (use_cuda_graph=True), planned before each replay.
An fp8 cache is read with k_scale folded into the softmax scale and v_scale applied to
the output (FlashInfer's k_scale / v_scale).

A plan ends with an asynchronous copy from the wrapper's pinned buffer to the device, so
planning a wrapper again before that copy ran would change the plan of the step still
queued (the host runs ahead of the GPU with asynchronous scheduling): each wrapper's
plan records an event, and its next plan waits for that event only.
"""
from __future__ import annotations

from itertools import accumulate
from typing import Optional

import torch

from raylm.kernels.attention.kv_cache import write_kv_cache
from raylm.workers.attention_backends import (AttentionBackend, AttentionMetadata,
                                              AttentionShape, require)

HEAD_DIMS = (64, 128, 256)  # the head sizes FlashInfer's paged kernels are built for
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace


def page_layout(block_tables: torch.Tensor, seq_lens: list[int], block_size: int, rows: Optional[int] = None):
    """(kv_indptr, kv_last_page_len) on the host and kv_indices on block_tables' device
    for sequences of these lengths; `rows` pads the batch with one-token sequences on
    page 0 of their table row (a captured graph's padding rows, whose output is dropped)."""
    rows = len(seq_lens) if rows is None else rows
    lens = list(seq_lens) + [1] * (rows - len(seq_lens))
    pages = [max(1, -(-n // block_size)) for n in lens]
    indptr = torch.tensor([0, *accumulate(pages)], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * block_size for n, p in zip(lens, pages)], dtype=torch.int32)
    total = int(indptr[-1])
    dev = block_tables.device
    counts = torch.tensor(pages, dtype=torch.int64).to(dev, non_blocking=True)
    row = torch.repeat_interleave(torch.arange(rows, device=dev), counts, output_size=total)
    starts = indptr[:-1].to(dev, non_blocking=True).long()
    col = torch.arange(total, device=dev) - starts[row]
    return indptr, last, block_tables[row, col]


class FlashInferBackend(AttentionBackend):
    """FlashInfer's paged decode and prefill wrappers (see the module docstring)."""

    name = "flashinfer"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = True

    def __init__(self):
        super().__init__()
        self._fi = require("flashinfer", "flashinfer-python", self.name)
        self._workspace: Optional[torch.Tensor] = None
        self._wrappers: dict[str, object] = {}  # op -> eager wrapper
        self._planned: Optional[tuple] = None  # (meta, wrapper) of the current eager step
        self._params: Optional[tuple] = None  # (shape, scale) of the last attend, for graph plans

    def refusal(self, op: str, shape: AttentionShape) -> Optional[str]:
        if shape.device.type != "cuda":
            return "FlashInfer runs on CUDA devices only"
        if shape.q_dtype not in (torch.float16, torch.bfloat16):
            return "FlashInfer takes float16 or bfloat16 queries"
        if shape.kv_dtype not in (shape.q_dtype, torch.float8_e4m3fn):
            return "the KV cache must hold the query's dtype or float8_e4m3fn"
        if shape.head_dim not in HEAD_DIMS:
            return f"head_dim must be one of {HEAD_DIMS}"
        if shape.num_heads % shape.num_kv_heads:
            return "num_heads must be a multiple of num_kv_heads"
        return None

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_cache(k, v, kv_cache, slot_mapping, k_scale, v_scale)

    def _workspace_for(self, device) -> torch.Tensor:
        if self._workspace is None:
            self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._workspace

    def _new_wrapper(self, op: str, shape: AttentionShape, buffers: Optional[dict] = None):
        ws = self._workspace_for(shape.device)
        graph = dict(use_cuda_graph=buffers is not None, **(buffers or {}))
        if op == "decode":
            # Tensor cores for grouped heads; the CUDA-core kernel for MHA and fp8 caches.
            tensor_cores = shape.num_heads > shape.num_kv_heads and shape.kv_dtype == shape.q_dtype
            if buffers is not None:
                graph = dict(use_cuda_graph=True, paged_kv_indptr_buffer=buffers["paged_kv_indptr_buf"],
                             paged_kv_indices_buffer=buffers["paged_kv_indices_buf"],
                             paged_kv_last_page_len_buffer=buffers["paged_kv_last_page_len_buf"])
            return self._fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores, **graph)
        return self._fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", **graph)

    def _plan(self, wrapper, op: str, shape: AttentionShape, scale: float, block_tables: torch.Tensor,
              query_lens: list[int], seq_lens: list[int], rows: Optional[int] = None) -> None:
        copied = getattr(wrapper, "_raylm_plan_copied", None)
        if copied is not None:
            copied.synchronize()  # the previous plan's pinned-buffer copy has run
        else:
            copied = wrapper._raylm_plan_copied = torch.cuda.Event()
        indptr, last, indices = page_layout(block_tables, seq_lens, shape.block_size, rows)
        common = dict(q_data_type=shape.q_dtype, kv_data_type=shape.kv_dtype, sm_scale=scale)
        heads = (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.block_size)
        if op == "decode":
            wrapper.plan(indptr, indices, last, *heads, **common)
        else:
            q_lens = list(query_lens) + [0] * ((rows or len(query_lens)) - len(query_lens))
            qo_indptr = torch.tensor([0, *accumulate(q_lens)], dtype=torch.int32)
            wrapper.plan(qo_indptr, indptr, indices, last, *heads, causal=True, **common)
        copied.record()

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        op = meta.op
        shape = self.check(op, q, kv_cache)
        wrapper = meta.backend_state
        if wrapper is None:
            if self._planned is None or self._planned[0] is not meta:
                if op not in self._wrappers:
                    self._wrappers[op] = self._new_wrapper(op, shape)
                self._plan(self._wrappers[op], op, shape, scale, meta.block_tables,
                           meta.query_lens_cpu, meta.seq_lens_cpu)
                self._planned = (meta, self._wrappers[op])
                self._params = (shape, scale)
            wrapper = self._planned[1]
        return wrapper.run(q, (kv_cache[0], kv_cache[1]), k_scale=float(k_scale), v_scale=float(v_scale))

    # ---- CUDA graphs: a wrapper with fixed buffers per captured metadata ----------
    def graph_prepare(self, meta: AttentionMetadata, max_blocks: int) -> None:
        if self._params is None:
            raise RuntimeError("FlashInferBackend.graph_prepare before any eager step (the "
                               "graph runner warms each size up eagerly first)")
        shape, _ = self._params
        rows = meta.block_tables.shape[0]
        dev = meta.block_tables.device
        buffers = dict(paged_kv_indptr_buf=torch.zeros(rows + 1, dtype=torch.int32, device=dev),
                       paged_kv_indices_buf=torch.zeros(rows * max_blocks, dtype=torch.int32, device=dev),
                       paged_kv_last_page_len_buf=torch.zeros(rows, dtype=torch.int32, device=dev))
        if meta.op == "prefill":
            buffers["qo_indptr_buf"] = torch.zeros(rows + 1, dtype=torch.int32, device=dev)
        meta.backend_state = self._new_wrapper(meta.op, shape, buffers)

    def graph_plan(self, meta: AttentionMetadata, query_lens: list[int], seq_lens: list[int]) -> None:
        shape, scale = self._params
        rows = meta.block_tables.shape[0]
        self._plan(meta.backend_state, meta.op, shape, scale, meta.block_tables, query_lens, seq_lens, rows)
