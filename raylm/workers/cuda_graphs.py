"""CUDA graphs (HIP graphs on ROCm, same PyTorch API) for decode steps.

A decode step (one new token per sequence) is captured once per padded batch size.
Inputs live in static buffers; a step copies its rows in, pads the rest (slot -1 writes
nothing, sequence length 0 reads nothing) and replays the graph of the smallest size that
fits. The graph covers the model's forward pass; the LM head runs outside it on the real
rows only, so no padded logits are kept per size.
"""
from __future__ import annotations

import logging
import time

import torch

from raylm.workers.layers.attention import AttentionMetadata
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
    with only the blocks a step adds, so a decode step gathers its rows in one call
    instead of rebuilding [batch, blocks] from Python lists."""

    def __init__(self, rows: int, max_blocks: int):
        self.table = torch.zeros(rows, max_blocks, dtype=torch.int32).pin_memory()
        self.known: dict[str, list] = {}  # request id -> [row, number of blocks written]
        self.free_rows = list(range(rows - 1, -1, -1))

    def drop(self, request_ids) -> None:
        for rid in request_ids:
            entry = self.known.pop(rid, None)
            if entry is not None:
                self.free_rows.append(entry[0])

    def gather(self, seqs) -> tuple[torch.Tensor, int]:
        """Pinned [len(seqs), width] int32 block tables of `seqs` (plan rows), and width.
        A new pinned buffer each call (PyTorch's pinned-memory cache recycles it once its
        copy has run): the previous step's copy may still be queued behind the GPU."""
        rows = []
        for s in seqs:
            entry = self.known.get(s.request_id)
            if entry is None:
                if not self.free_rows:
                    raise RuntimeError("more running requests than max_num_seqs")
                entry = self.known[s.request_id] = [self.free_rows.pop(), 0]
            row, n = entry
            table = s.block_table
            if len(table) > n:
                self.table[row, n:len(table)] = torch.tensor(table[n:], dtype=torch.int32)
                entry[1] = len(table)
            rows.append(row)
        width = max(len(s.block_table) for s in seqs)
        idx = torch.tensor(rows, dtype=torch.long)
        out = torch.empty((len(rows), self.table.shape[1]), dtype=torch.int32, pin_memory=True)
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

    def _meta(self, b: int) -> AttentionMetadata:
        # The decode kernels read only these tensors; the *_cpu fields are placeholders.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b, max_query_len=1,
            max_seq_len=self.max_blocks)

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
                self._forward(b)  # compile the Triton kernels for this shape outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                pool = graph.pool() if pool is None else pool
                self.graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t
        self.capture_bytes = torch.cuda.memory_allocated() - before
        logger.info("captured %d decode CUDA graphs (batch sizes 1..%d) in %.1f s using %.0f MiB",
                    len(self.graphs), self.max_batch, self.capture_s, self.capture_bytes / 2**20)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks <= self.max_blocks

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            seq_lens: list[int], tables: tuple[torch.Tensor, int], placeholders=None) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode step of n sequences; `tables` is
        HostBlockTables.gather's (pinned rows, width); `placeholders` (rows, tokens on the
        device) overwrite input ids that the previous step is still sampling. Nothing here
        waits for the GPU."""
        n = len(input_ids)
        b = next(s for s in self.sizes if s >= n)
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
        self.graphs[b].replay()
        return self.outputs[b][:n]
