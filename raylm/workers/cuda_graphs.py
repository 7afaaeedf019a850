"""CUDA graphs (HIP graphs on ROCm, same PyTorch API) for decode steps and for short
prefills of one sequence.

A decode step (one new token per sequence) is captured once per padded batch size.
Inputs live in static buffers; a step copies its rows in, pads the rest (slot -1 writes
nothing, sequence length 0 reads nothing) and replays the graph of the smallest size that
fits. The graph covers the model's forward pass; the LM head runs outside it on the real
rows only, so no padded logits are kept per size.

A step that prefills one sequence (a new prompt, or a chunk of one after a prefix-cache
hit) with at most PREFILL_GRAPH_MAX_TOKENS tokens replays a graph captured per padded
token count T: the n real tokens, then T - n padding rows that write nothing (slot -1)
and come after every real query, so causal attention never shows them to a real row.
Eagerly such a step is bound by kernel launches (a few hundred for a 0.6B model), which
is most of the time to first token at batch 1.

Backends that plan on the host (FlashInfer) get their plan outside the graph: the graph
runner builds each size's metadata once, lets the backend that runs the operation
(`backend.for_op`) prepare fixed buffers for it (graph_prepare) and plan it from the
step's host-side lengths before every replay (graph_plan). A backend that cannot be
captured (supports_cuda_graphs False) leaves its operation to eager steps.
"""
from __future__ import annotations

import logging
import time

import torch

from raylm.workers.attention_backends import AttentionMetadata
from raylm.workers.transfer import to_device

logger = logging.getLogger("raylm")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (capped at 512), as vLLM."""
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4) if b <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


class HostBlockTables:
    """Each running request's block table kept in a row of a pinned host tensor, updated
    with only the blocks added since the last gather, so a decode step gathers its rows in
    one call instead of rebuilding [batch, blocks] from Python lists."""

    def __init__(self, rows: int, max_blocks: int):
        table = torch.zeros(rows, max_blocks, dtype=torch.int32)
        self.table = table.pin_memory() if torch.cuda.is_available() else table
        self.known: dict[str, list] = {}  # request id -> [row, number of blocks written]
        self.free_rows = list(range(rows - 1, -1, -1))

    def drop(self, request_ids) -> None:
        """Forget these requests (finished, or preempted: their tables start over)."""
        for rid in request_ids:
            entry = self.known.pop(rid, None)
            if entry is not None:
                self.free_rows.append(entry[0])

    def gather(self, request_ids: list[str], tables: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Pinned [len(request_ids), width] int32 block tables of these requests, given
        their full tables (the worker's, which only grow until a drop), and width.
        A new pinned buffer each call (PyTorch's pinned-memory cache recycles it once its
        copy has run): the previous step's copy may still be queued behind the GPU."""
        rows = []
        for rid, table in zip(request_ids, tables):
            entry = self.known.get(rid)
            if entry is None:
                if not self.free_rows:
                    raise RuntimeError("more running requests than max_num_seqs")
                entry = self.known[rid] = [self.free_rows.pop(), 0]
            row, n = entry
            if len(table) > n:
                self.table[row, n:len(table)] = torch.tensor(table[n:], dtype=torch.int32)
                entry[1] = len(table)
            rows.append(row)
        width = max(len(t) for t in tables)
        idx = torch.tensor(rows, dtype=torch.long)
        out = torch.empty((len(rows), self.table.shape[1]), dtype=torch.int32,
                          pin_memory=self.table.is_pinned())
        torch.index_select(self.table, 0, idx, out=out)
        return out, width


class DecodeGraphs:
    """Captured decode forward passes of one model over its KV cache."""

    def __init__(self, model, backend, device: torch.device, max_num_seqs: int, max_blocks: int):
        self.model = model
        self.backend = backend
        self.sizes = graph_batch_sizes(max_num_seqs)
        b = self.sizes[-1]
        self.max_batch = b
        self.max_blocks = max_blocks
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(b, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        self.capture_bytes = 0
        self.pool = None  # the memory pool the graphs share (PrefillGraphs joins it)
        self.metas: dict[int, AttentionMetadata] = {}
        # The backend that runs each captured size's decode (backend.for_op: "auto" may
        # choose by batch size), known after an eager pass of that size.
        self.impls: dict[int, object] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        # Triton's decode reads only the tensors; the *_cpu fields are placeholders that a
        # host-planning backend's graph_plan replaces each step.
        if b not in self.metas:
            self.metas[b] = AttentionMetadata(
                slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
                seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
                query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b, max_query_len=1,
                max_seq_len=self.max_blocks * _block_size(self.model))
        return self.metas[b]

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self._meta(b), self.backend)

    @torch.inference_mode()
    def capture(self) -> None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first, so smaller ones reuse its pool
                self._forward(b)  # compile the kernels for this shape outside capture (eagerly)
                impl = self.impls[b] = self.backend.for_op("decode", b)
                if not impl.supports_cuda_graphs:
                    logger.info("attention backend %r cannot be captured: decode of %d sequences runs eagerly",
                                impl.name, b)
                    break
                meta = self._meta(b)
                impl.graph_prepare(meta, self.max_blocks)
                impl.graph_plan(meta, [1] * b, [1] * b)
                self._forward(b)  # and the graph-mode launch, outside capture too
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                pool = graph.pool() if pool is None else pool
                self.graphs[b] = graph
        self.pool = pool
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t
        self.capture_bytes = torch.cuda.memory_allocated() - before
        logger.info("captured %d decode CUDA graphs (batch sizes 1..%d) in %.1f s using %.0f MiB",
                    len(self.graphs), self.max_batch, self.capture_s, self.capture_bytes / 2**20)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        if not self.graphs or num_seqs > self.max_batch or max_blocks > self.max_blocks:
            return False
        return self._size(num_seqs) in self.graphs  # sizes past a refusal lack one

    def _size(self, n: int) -> int:
        """The smallest captured batch size that holds n sequences."""
        return next(s for s in self.sizes if s >= n)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            seq_lens: list[int], tables: tuple[torch.Tensor, int], placeholders=None) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode step of n sequences; `tables` is
        HostBlockTables.gather's (pinned rows, width); `placeholders` (rows, tokens on the
        device) overwrite input ids that the previous step is still sampling. Nothing here
        waits for the GPU."""
        n = len(input_ids)
        b = self._size(n)
        dev = self.input_ids.device
        cols = to_device([input_ids, positions, slots, seq_lens], torch.long, dev)
        self.input_ids[:n].copy_(cols[0])
        if placeholders is not None:
            self.input_ids.index_copy_(0, *placeholders)
        self.positions[:n].copy_(cols[1])
        self.slot_mapping[:n].copy_(cols[2])
        self.seq_lens[:n].copy_(cols[3])
        # Only the columns this step uses: entries past a row's length are never read.
        table, width = tables
        self.block_tables[:n, :width].copy_(table[:, :width], non_blocking=True)
        if b > n:
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].zero_()
        self.impls[b].graph_plan(self.metas[b], [1] * n, seq_lens)
        self.graphs[b].replay()
        return first_rows(self.outputs[b], n)


def first_rows(out, n: int):
    """The first n rows of a graph's output: a tensor, or a tuple of them (a target
    that also returns its aux hidden states for an EAGLE-3 head)."""
    if isinstance(out, tuple):
        return tuple(x[:n] for x in out)
    return out[:n]


def _block_size(model) -> int:
    """The KV cache's block size, read off the model's first attention layer."""
    return model.attention_layers()[0].kv_cache.shape[2]


PREFILL_GRAPH_MAX_TOKENS = 512


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts captured for one-sequence prefills: powers of two from 16 up to
    min(max_tokens, PREFILL_GRAPH_MAX_TOKENS), and that bound itself."""
    top = min(max_tokens, PREFILL_GRAPH_MAX_TOKENS)
    sizes = [t for t in (16, 32, 64, 128, 256, 512) if t <= top]
    if top >= 2 and (not sizes or sizes[-1] < top):
        sizes.append(top)
    return sizes


class PrefillGraphs:
    """Captured forward passes of one sequence's prefill (chunk) at padded token counts,
    sharing the decode graphs' memory pool. Query row j of a T-row graph sits at position
    seq_len - T + j, so with seq_len = start + T the n real rows keep their positions and
    the padding follows them."""

    def __init__(self, model, backend, device: torch.device, max_tokens: int, max_blocks: int,
                 block_size: int):
        self.model = model
        self.backend = backend
        self.sizes = prefill_graph_sizes(max_tokens)
        t = self.sizes[-1] if self.sizes else 0
        self.max_tokens = t
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.input_ids = torch.zeros(t, dtype=torch.long, device=device)
        self.positions = torch.zeros(t, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(1, max_blocks, dtype=torch.int32, device=device)
        self.query_start = {n: torch.tensor([0, n], dtype=torch.int32, device=device) for n in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        self.metas: dict[int, AttentionMetadata] = {}
        self.impl = None  # the backend that runs prefill (backend.for_op), known after a pass

    def _meta(self, t: int) -> AttentionMetadata:
        if t not in self.metas:
            self.metas[t] = AttentionMetadata(
                slot_mapping=self.slot_mapping[:t], query_start_loc=self.query_start[t],
                seq_lens=self.seq_lens, block_tables=self.block_tables,
                query_lens_cpu=[t], seq_lens_cpu=[t], max_query_len=t,
                max_seq_len=self.max_blocks * self.block_size)
        return self.metas[t]

    def _forward(self, t: int) -> torch.Tensor:
        return self.model(self.input_ids[:t], self.positions[:t], self._meta(t), self.backend)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.seq_lens.fill_(self.max_tokens)  # reads block 0 while capturing: harmless
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in reversed(self.sizes):
                self._forward(t)  # compile outside the capture
                self.impl = self.backend.for_op("prefill")
                if not self.impl.supports_cuda_graphs:
                    logger.info("attention backend %r cannot be captured: prefills run eagerly",
                                self.impl.name)
                    self.sizes, self.max_tokens = [], 0
                    break
                meta = self._meta(t)
                self.impl.graph_prepare(meta, self.max_blocks)
                self.impl.graph_plan(meta, [t], [self.max_tokens])
                self._forward(t)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[t] = self._forward(t)
                pool = graph.pool() if pool is None else pool
                self.graphs[t] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d one-sequence prefill CUDA graphs (%s tokens) in %.1f s",
                    len(self.graphs), "/".join(map(str, self.sizes)), self.capture_s)

    def size_for(self, num_tokens: int, start_pos: int) -> int:
        """The graph's token count for a prefill of num_tokens tokens after start_pos
        cached ones, or 0 when none fits (too many tokens, too long a block table)."""
        if num_tokens < 2 or num_tokens > self.max_tokens:
            return 0
        t = next(s for s in self.sizes if s >= num_tokens)
        return t if -(-(start_pos + t) // self.block_size) <= self.max_blocks else 0

    def run(self, t: int, input_ids: list[int], start_pos: int, slots: list[int], block_table: list[int],
            placeholders=None) -> torch.Tensor:
        """Hidden states [n, hidden] of the prefill of input_ids at positions start_pos..,
        writing the KV cache at `slots`, in the graph of `t` (size_for) tokens. Nothing here
        waits for the GPU."""
        n = len(input_ids)
        dev = self.input_ids.device
        positions = list(range(start_pos, start_pos + n)) + [0] * (t - n)  # padding: any valid position
        cols = to_device([input_ids + [0] * (t - n), positions, slots + [-1] * (t - n)], torch.long, dev)
        self.input_ids[:t].copy_(cols[0])
        if placeholders is not None:
            self.input_ids.index_copy_(0, *placeholders)
        self.positions[:t].copy_(cols[1])
        self.slot_mapping[:t].copy_(cols[2])
        width = len(block_table)
        table = to_device([[start_pos + t] + block_table], torch.int32, dev)[0]
        self.seq_lens.copy_(table[:1])
        self.block_tables[0, :width].copy_(table[1:])
        graph = self.graphs.get(t)
        if graph is None:  # not captured (the CPU tests): the same padded pass, eagerly
            self.outputs[t] = self._forward(t)
        else:
            self.impl.graph_plan(self.metas[t], [t], [start_pos + t])
            graph.replay()
        return first_rows(self.outputs[t], n)
