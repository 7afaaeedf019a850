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

Decode runs FlashInfer's CUDA-core kernel only where it exists: query heads per kv head
in (1, 2, 3, 4, 8) (DISPATCH_GQA_GROUP_SIZE); other groups, and grouped heads over a
cache in the query's dtype, take the tensor-core (FA2 prefill template) kernel.

The float workspace holds split-KV partial outputs. In CUDA-graph mode FlashInfer always
splits and pads the work to an upper bound that grows with the captured batch (for a
512-row decode graph of Llama-3.1-8B's heads it needs 161 MiB), so the workspace is sized
from the head layout and each captured size (float_workspace_bytes), never below the
recommended 128 MiB.

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
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (the least we allocate)
# Each wrapper allocates its own int workspace of this size on the device (decode.py and
# prefill.py of flashinfer 0.6.14), and as much pinned host memory.
INT_WORKSPACE_BYTES = 8 << 20
# Query heads per kv head that the CUDA-core decode kernel is compiled for
# (DISPATCH_GQA_GROUP_SIZE, include/flashinfer/utils.cuh); others raise "Unsupported group_size".
CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4, 8)


def decode_uses_tensor_cores(num_heads: int, num_kv_heads: int, q_dtype: torch.dtype,
                             kv_dtype: torch.dtype) -> bool:
    """Whether decode takes the tensor-core kernel (use_tensor_cores=True): for grouped heads
    over a cache in the query's dtype, and for any group the CUDA-core kernel lacks; the
    CUDA-core kernel for MHA and for an fp8 cache at the groups it has."""
    group = num_heads // num_kv_heads
    return group not in CUDA_CORE_DECODE_GROUPS or (group > 1 and kv_dtype == q_dtype)


def _fa2_cta_tile_q(packed_qo_len: int, head_dim: int) -> int:
    """FlashInfer's FA2DetermineCtaTileQ (include/flashinfer/utils.cuh) on SM80 and later."""
    if head_dim >= 512:
        return 16 if packed_qo_len <= 32 else 32
    if packed_qo_len > 64 and head_dim < 256:
        return 128
    return 64 if packed_qo_len > 16 else 16


def float_workspace_bytes(num_heads: int, num_kv_heads: int, head_dim: int, num_sms: int,
                          rows: Optional[int] = None, tokens: Optional[int] = None) -> int:
    """The float workspace FlashInfer's plans can take at this head layout on a GPU of
    num_sms SMs, rounded up to MiB and at least WORKSPACE_BYTES. The largest user is the
    FA2 template's split-KV (prefill wrapper, tensor-core decode; PrefillPlan in
    attention/scheduler.cuh): float32 [num_heads, tiles, cta_tile_q, head_dim + 1]. Eagerly
    (rows None) it splits only while tiles <= max_batch_size_if_split = 2 * num_sms //
    num_kv_heads. A CUDA-graph wrapper of `rows` sequences and `tokens` query rows always
    splits, into max(that, ceil(tokens * group / cta_tile_q) + rows - 1) tiles with
    cta_tile_q fixed by the longest possible query. The CUDA-core decode kernel's
    float32 [num_heads, max_grid / num_kv_heads, head_dim + 1] (at most 32 CTAs per SM) is
    covered too."""
    group = num_heads // num_kv_heads
    max_split = 2 * num_sms // num_kv_heads
    if rows is None:
        cta, tiles = _fa2_cta_tile_q(1 << 30, head_dim), max_split
    else:
        cta = _fa2_cta_tile_q((tokens - rows + 1) * group, head_dim)
        tiles = max(max_split, -(-tokens * group // cta) + rows - 1)
    split = num_heads * tiles * cta * (head_dim + 1) * 4
    cuda_core_decode = num_heads * (32 * num_sms // num_kv_heads) * (head_dim + 1) * 4
    need = max(split, cuda_core_decode) + (1 << 20)  # + alignment of the allocations
    return max(WORKSPACE_BYTES, -(-need >> 20) << 20)


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
    triton_kv_write = True

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

    def memory_reserve_bytes(self, num_heads: int, num_kv_heads: int, head_dim: int, num_graphs: int,
                             max_rows: int, max_tokens: int, num_sms: Optional[int] = None) -> int:
        """An int workspace per wrapper (one per captured graph, one per eager operation)
        and the shared float workspace at the largest graph's size."""
        if num_sms is None:
            if not torch.cuda.is_available():
                return 0
            num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        floats = float_workspace_bytes(num_heads, num_kv_heads, head_dim, num_sms,
                                       max_rows if num_graphs else None,
                                       max(max_tokens, max_rows) if num_graphs else None)
        return (num_graphs + 2) * INT_WORKSPACE_BYTES + floats

    def _workspace_for(self, shape: AttentionShape, rows: Optional[int] = None,
                       tokens: Optional[int] = None) -> torch.Tensor:
        """The shared float workspace, grown to what a wrapper of `rows` sequences and
        `tokens` query rows (a CUDA graph's; None: eager) can take at `shape`."""
        num_sms = torch.cuda.get_device_properties(shape.device).multi_processor_count
        need = float_workspace_bytes(shape.num_heads, shape.num_kv_heads, shape.head_dim, num_sms,
                                     rows, tokens)
        if self._workspace is None or self._workspace.numel() < need:
            if self._workspace is not None:
                # The eager wrappers keep the smaller buffer; let them go (the next eager step
                # makes them again) once their queued plan copies from pinned memory have run.
                # Graph wrappers made before keep theirs, which their plans fit.
                torch.cuda.synchronize(shape.device)
                self._wrappers.clear()
                self._planned = None
            self._workspace = torch.zeros(need, dtype=torch.uint8, device=shape.device)
        return self._workspace

    def _new_wrapper(self, op: str, shape: AttentionShape, buffers: Optional[dict] = None,
                     tokens: Optional[int] = None):
        tensor_cores = op == "decode" and decode_uses_tensor_cores(shape.num_heads, shape.num_kv_heads,
                                                                   shape.q_dtype, shape.kv_dtype)
        # Graph wrappers of the FA2 template (prefill, tensor-core decode) pad their split
        # work; the CUDA-core decode kernel's fits the eager bound.
        fa2_graph = buffers is not None and (op == "prefill" or tensor_cores)
        rows = len(buffers["paged_kv_last_page_len_buf"]) if fa2_graph else None
        ws = self._workspace_for(shape, rows, tokens if fa2_graph else None)
        graph = dict(use_cuda_graph=buffers is not None, **(buffers or {}))
        if op == "decode":
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
        # The graph's first plan (graph_plan at capture) fixes its query rows for good.
        meta.backend_state = self._new_wrapper(meta.op, shape, buffers, tokens=sum(meta.query_lens_cpu))

    def graph_plan(self, meta: AttentionMetadata, query_lens: list[int], seq_lens: list[int]) -> None:
        shape, scale = self._params
        rows = meta.block_tables.shape[0]
        self._plan(meta.backend_state, meta.op, shape, scale, meta.block_tables, query_lens, seq_lens, rows)
