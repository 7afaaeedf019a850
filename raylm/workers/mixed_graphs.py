"""CUDA graphs for mixed steps: decode rows of many sequences beside prefill chunks.

Under serving load nearly every step is mixed (a request arrives while others decode),
and eagerly such a step is bound by kernel launches: about 15 per layer, 8 ms a step
for Llama-3.1-8B or Qwen3-0.6B on an H200, which for a small model is more than the GPU
needs. A mixed step of n tokens over m sequences replays the graph captured for the
smallest padded token count T >= n, over a fixed number of sequence slots S =
max_num_seqs + 1:

- rows 0..n-1 are the step's tokens, packed by sequence as in an eager step;
- sequence m owns the padding rows n..T-1: sequence length T - n through a block table of
  zeros (block 0), so its queries read finite keys, and slot -1, so nothing is written;
- sequences m+1..S-1 are empty (no rows, length 0).

Only our Triton prefill kernel is captured this way: its grid depends on T and S alone
and each program finds its sequence in `query_start_loc` on the device. Other backends
(which plan on the host per sequence) leave mixed steps eager. The LM head runs outside
the graph on the real rows, as for the other graphs.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from raylm.workers.attention_backends import AttentionMetadata
from raylm.workers.cuda_graphs import first_rows
from raylm.workers.transfer import to_device

logger = logging.getLogger("raylm")

# The largest mixed step captured; bigger ones (a long prompt's first chunk) run eagerly,
# where the launches are a small share of the GPU time anyway.
MIXED_GRAPH_MAX_TOKENS = 2048


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts captured: every multiple of 128 up to 1024, then of 256 up to
    min(max_tokens, MIXED_GRAPH_MAX_TOKENS). Finer steps at the small end, where most
    serving steps fall and padding costs the most relative to the step."""
    top = min(max_tokens, MIXED_GRAPH_MAX_TOKENS)
    sizes = [t for t in range(128, 1025, 128) if t <= top]
    sizes += [t for t in range(1280, top + 1, 256)]
    return sizes


def mixed_graphs_enabled() -> bool:
    """RAYLM_MIXED_GRAPHS=0 turns them off (to measure what they save)."""
    return os.environ.get("RAYLM_MIXED_GRAPHS", "1") != "0"


class MixedGraphs:
    """Captured forward passes of mixed steps at padded token counts (see module doc),
    sharing the decode graphs' memory pool."""

    def __init__(self, model, backend, device: torch.device, max_num_seqs: int, max_tokens: int,
                 max_blocks: int, block_size: int):
        self.model = model
        self.backend = backend
        self.sizes = mixed_graph_sizes(max_tokens)
        t = self.sizes[-1] if self.sizes else 0
        self.max_tokens = t
        self.num_slots = max_num_seqs + 1
        self.max_blocks = max_blocks
        self.block_size = block_size
        s = self.num_slots
        self.input_ids = torch.zeros(t, dtype=torch.long, device=device)
        self.positions = torch.zeros(t, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self.capture_s = 0.0
        self.capture_bytes = 0

    @staticmethod
    def supported(backend) -> bool:
        """Whether mixed steps of `backend` can be captured (only our Triton kernels)."""
        return getattr(backend.for_op("prefill"), "name", None) == "triton"

    def _meta(self, t: int) -> AttentionMetadata:
        if t not in self.metas:
            # The Triton prefill kernel reads only the tensors; max_query_len picks its
            # tile (t >= 128 takes the large one, as any step with a prefill chunk).
            self.metas[t] = AttentionMetadata(
                slot_mapping=self.slot_mapping[:t], query_start_loc=self.query_start_loc,
                seq_lens=self.seq_lens, block_tables=self.block_tables,
                query_lens_cpu=[t] + [0] * (self.num_slots - 1), seq_lens_cpu=[t] + [0] * (self.num_slots - 1),
                max_query_len=t, max_seq_len=self.max_blocks * self.block_size)
        return self.metas[t]

    def _forward(self, t: int) -> torch.Tensor:
        return self.model(self.input_ids[:t], self.positions[:t], self._meta(t), self.backend)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in reversed(self.sizes):  # largest first: the others reuse its memory
                self._set_lengths([0, t], [t], t)  # one sequence owning every row
                self._forward(t)  # compile outside the capture
                if not self.supported(self.backend):  # "auto" chose another prefill backend
                    logger.info("mixed steps run eagerly: their attention backend is not ours")
                    self.sizes, self.max_tokens = [], 0
                    break
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[t] = self._forward(t)
                pool = graph.pool() if pool is None else pool
                self.graphs[t] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        self.capture_bytes = torch.cuda.memory_allocated() - before
        logger.info("captured %d mixed-step CUDA graphs (%s tokens, %d sequence slots) in %.1f s using %.0f MiB",
                    len(self.graphs), "/".join(map(str, self.sizes)), self.num_slots, self.capture_s,
                    self.capture_bytes / 2**20)

    def size_for(self, num_tokens: int, num_seqs: int, max_blocks: int) -> int:
        """The padded token count of a mixed step's graph, or 0 when none fits."""
        if not self.sizes or num_tokens > self.max_tokens or num_seqs >= self.num_slots \
                or max_blocks > self.max_blocks:
            return 0
        return next(s for s in self.sizes if s >= num_tokens)

    def _set_lengths(self, query_start: list[int], seq_lens: list[int], t: int) -> None:
        """Sequence slots for real sequences with these query starts and lengths, then the
        padding sequence (rows query_start[-1]..t-1), then empty ones."""
        n, m, s = query_start[-1], len(seq_lens), self.num_slots
        qsl = query_start + [t] * (s - m)
        lens = seq_lens + [t - n] + [0] * (s - m)  # one more than the slots: same length as qsl
        cols = to_device([qsl, lens], torch.int32, self.query_start_loc.device)
        self.query_start_loc.copy_(cols[0])
        self.seq_lens.copy_(cols[1][:s])

    def run(self, t: int, input_ids: list[int], positions: list[int], slots: list[int],
            query_start: list[int], seq_lens: list[int], tables: tuple[torch.Tensor, int],
            placeholders=None) -> torch.Tensor:
        """Hidden states [n, hidden] of a mixed step of n tokens (packed by sequence, as
        `query_start` says) in the graph of `t` (size_for) tokens; `tables` is
        HostBlockTables.gather's (pinned rows of the step's sequences, width). Nothing here
        waits for the GPU."""
        n, m = len(input_ids), len(seq_lens)
        pad = t - n
        cols = to_device([input_ids + [0] * pad, positions + list(range(pad)), slots + [-1] * pad],
                         torch.long, self.input_ids.device)
        self.input_ids[:t].copy_(cols[0])
        if placeholders is not None:
            self.input_ids.index_copy_(0, *placeholders)
        self.positions[:t].copy_(cols[1])
        self.slot_mapping[:t].copy_(cols[2])
        self._set_lengths(query_start, seq_lens, t)
        table, width = tables
        self.block_tables[:m, :width].copy_(table[:, :width], non_blocking=True)
        # The padding sequence's table must read block 0 only (its rows may be stale).
        self.block_tables[m, :-(-pad // self.block_size) or 1].zero_()
        graph = self.graphs.get(t)
        if graph is None:  # not captured (the CPU tests): the same padded pass, eagerly
            self.outputs[t] = self._forward(t)
        else:
            graph.replay()
        return first_rows(self.outputs[t], n)
