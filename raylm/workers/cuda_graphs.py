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

logger = logging.getLogger("raylm")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (capped at 512), as vLLM."""
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4) if b <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


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
            seq_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode step of n sequences."""
        n = len(input_ids)
        b = next(s for s in self.sizes if s >= n)
        dev = self.input_ids.device
        cols = torch.tensor([input_ids, positions, slots, seq_lens], dtype=torch.long).to(dev)
        # Only the columns this step uses: entries past a row's length are never read.
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).to(dev)
        self.input_ids[:n].copy_(cols[0])
        self.positions[:n].copy_(cols[1])
        self.slot_mapping[:n].copy_(cols[2])
        self.seq_lens[:n].copy_(cols[3])
        self.block_tables[:n, :width].copy_(table)
        if b > n:
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].zero_()
        self.graphs[b].replay()
        return self.outputs[b][:n]
