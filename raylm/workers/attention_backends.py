"""Paged attention backends: the metadata a step carries, the backend interface, the
registry of backends by name, and "auto", which picks one backend per operation.

Backends (each in raylm/workers/attention/, imported only when asked for):
- "torch": the PyTorch reference, the CPU path.
- "triton": our Triton kernels (split-K decode, varlen paged prefill).
- "flashinfer": FlashInfer's paged decode / prefill wrappers (flashinfer-python).
- "flash_attn": FlashAttention-4's varlen forward over the page table (flash-attn-4).
- "auto": per operation ("decode", "prefill"; decode steps of at most
  AUTO_SMALL_DECODE_SEQS sequences apart, as "decode_small", and prefill steps of more than
  AUTO_LONG_PREFILL_TOKENS new tokens without decode rows, as "prefill_long"), the first
  backend of AUTO_RULES that is installed and accepts the shape, else "triton".

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]. Token t
of a sequence lives in block `block_table[t // block_size]` at offset `t % block_size`;
`slot_mapping` gives each new token's flat slot (block_id * block_size + offset).
kv_cache_dtype="fp8" stores clamp(x / scale, +-448) as float8_e4m3fn, one float scale for
K and one for V per layer (Attention.k_scale / v_scale).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from raylm.kernels.interpret import runs_kernel

logger = logging.getLogger("raylm")

# A backend's operations (AttentionMetadata.op): a decode step (one query per sequence),
# anything else. "auto" keeps small decode steps apart ("decode_small").
AUTO_OPS = ("decode", "decode_small", "prefill", "prefill_long")

# The rotary embedding and the KV-cache write in one launch where the cache is written by
# raylm's kernel (AttentionBackend.rotary_write_kv); RAYLM_FUSED_ROPE_KV=0: two launches.
FUSED_ROPE_KV = os.environ.get("RAYLM_FUSED_ROPE_KV", "1") != "0"


@dataclass
class AttentionMetadata:
    """Per-step inputs every attention layer reads. Sequences are packed: sequence i's
    new tokens are rows query_start_loc[i]:query_start_loc[i+1] of q/k/v."""

    slot_mapping: torch.Tensor      # [num_tokens] int64
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor          # [num_seqs] int32: cached + new tokens
    block_tables: torch.Tensor      # [num_seqs, max_blocks] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # A backend's state for a captured CUDA graph of this metadata (a planned wrapper);
    # None in eager steps, which each backend plans for itself.
    backend_state: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @property
    def op(self) -> str:
        return "decode" if self.max_query_len == 1 else "prefill"


@dataclass(frozen=True)
class AttentionShape:
    """What a backend needs to know to accept or refuse a layer's attention."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, q: torch.Tensor, kv_cache: torch.Tensor) -> "AttentionShape":
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(q.shape[1], num_kv_heads, head_dim, block_size, q.dtype, kv_cache.dtype, q.device)

    def describe(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, block_size={self.block_size}, "
                f"dtype={str(self.q_dtype).removeprefix('torch.')}, "
                f"kv_cache_dtype={str(self.kv_dtype).removeprefix('torch.')}, device={self.device}")


class AttentionBackend:
    """Writes new K/V into the paged cache and attends each query to its sequence's
    cached prefix plus itself (causal). With an fp8 cache, K and V are stored divided by
    k_scale / v_scale; backends that cannot read one leave `supports_fp8_kv_cache` False.

    A backend refuses a shape it cannot run (`refusal`) at its first use, with an error
    naming the shape. Backends whose launches only read tensors set supports_cuda_graphs;
    those that plan on the host (FlashInfer) also implement graph_prepare / graph_plan,
    which the CUDA-graph runner calls before capture and before each replay."""

    name = "base"
    supports_fp8_kv_cache = False
    supports_cuda_graphs = False
    triton_kv_write = False  # write_kv is raylm.kernels.attention.kv_cache.write_kv_cache

    def __init__(self):
        self._accepted: set = set()

    def memory_reserve_bytes(self, num_heads: int, num_kv_heads: int, head_dim: int, num_graphs: int,
                             max_rows: int, max_tokens: int) -> int:
        """Device memory the backend allocates for itself beside the KV cache (planning
        workspaces) at this layer layout (this rank's heads), with `num_graphs` captured
        CUDA graphs of up to `max_rows` sequences and `max_tokens` query rows."""
        return 0

    def refusal(self, op: str, shape: AttentionShape) -> Optional[str]:
        """Why this backend cannot run `op` ("decode" or "prefill") at `shape`; None if it can."""
        return None

    def check(self, op: str, q: torch.Tensor, kv_cache: torch.Tensor) -> AttentionShape:
        """Raise a ValueError naming the shape if this backend refuses it (checked once)."""
        shape = AttentionShape.of(q, kv_cache)
        if (op, shape) not in self._accepted:
            reason = self.refusal(op, shape)
            if reason is not None:
                raise ValueError(f"attention_backend {self.name!r} cannot run {op} at "
                                 f"{shape.describe()}: {reason}")
            self._accepted.add((op, shape))
        return shape

    def for_op(self, op: str, num_seqs: Optional[int] = None) -> "AttentionBackend":
        """The backend that runs `op` over `num_seqs` sequences (a CUDA graph's rows; None:
        any): itself; "auto" answers its choice."""
        return self

    def graph_prepare(self, meta: AttentionMetadata, max_blocks: int) -> None:
        """Before capturing a CUDA graph over `meta` (fixed buffers, max_blocks per row)."""

    def graph_plan(self, meta: AttentionMetadata, query_lens: list[int], seq_lens: list[int]) -> None:
        """Before a replay of the graph over `meta`: the step's lengths, on the host (rows
        past len(seq_lens) are padding)."""

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        raise NotImplementedError

    def rotary_write_kv(self, rotary, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """The rotary embedding `rotary` (a RotaryEmbedding) at `positions` on q and k, then
        write_kv of the rotated k and v; returns the rotated q. A backend whose cache is
        written by raylm's Triton kernel (triton_kv_write) does both in one launch wherever
        that kernel runs (CUDA, or Triton's interpreter); RAYLM_FUSED_ROPE_KV=0: two."""
        if self.triton_kv_write and FUSED_ROPE_KV and runs_kernel(q.device):
            from raylm.kernels.attention.kv_cache import rotary_write_kv_cache

            rotary_write_kv_cache(positions, q, k, v, rotary.cos_cache, rotary.sin_cache, kv_cache,
                                  slot_mapping, k_scale, v_scale)
            return q
        q, k = rotary(positions, q, k)
        self.write_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        return q

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


# name -> "module:Class", imported when first asked for (tests may register classes).
_BACKENDS: dict[str, Any] = {
    "torch": "raylm.workers.attention.torch_backend:TorchAttentionBackend",
    "triton": "raylm.workers.attention.triton_backend:TritonAttentionBackend",
    "flashinfer": "raylm.workers.attention.flashinfer_backend:FlashInferBackend",
    "flash_attn": "raylm.workers.attention.flash_attn_backend:FlashAttnBackend",
    "auto": "raylm.workers.attention_backends:AutoAttentionBackend",
}


def register_backend(name: str, cls) -> None:
    """Make `cls` (an AttentionBackend class, or "module:Class") available as `name`."""
    _BACKENDS[name] = cls


def backend_class(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not available; choose from {sorted(_BACKENDS)}")
    cls = _BACKENDS[name]
    if isinstance(cls, str):
        module, attr = cls.split(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls


def get_attention_backend(name: str) -> AttentionBackend:
    """A new backend instance by name; ImportError naming the package when it is missing."""
    return backend_class(name)()


def require(module: str, package: str, backend: str):
    """Import `module` for `backend`, or raise an ImportError naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"attention_backend {backend!r} needs the {package} package, which is "
                          f"not installed (pip install {package}; see benchmarks/ATTENTION_INSTALL.md)") from e


def default_backend(device: str) -> str:
    """The attention backend to use when none is asked for: "auto" on CUDA (Triton unless
    AUTO_RULES prefers an installed package), the PyTorch reference elsewhere."""
    return "auto" if torch.device(device).type == "cuda" else "torch"


# Per operation, the backends "auto" prefers, best first; "triton" is always the last
# resort. From benchmarks/attention.py (Llama-3.1-8B's heads, block 16, bf16 cache, one
# layer, CUDA graphs) on an H100, 2026-12-05 (benchmarks/results/attention-h100.json),
# and the end-to-end runs beside it:
# - decode: FlashInfer 1-8 % faster than Triton at batch 64 and 256 for 1k to 32k
#   contexts (360 against 392 us at 256 x 1k) and at batch 1 from 8k context; at batch 1
#   and 1k context it is slower (8.1 against 5.5 us), and its per-step plan costs host
#   time: batch-1 TPOT went up 3 % (6.47 against 6.27 ms, 128-token prompt). So decode
#   steps of at most AUTO_SMALL_DECODE_SEQS sequences stay on Triton (nothing was measured
#   between batch 1 and 64). FlashAttention-4 is within 2 % of FlashInfer from batch 64 and
#   7x slower at batch 1 and 32k (no split-KV on SM90). Offline, FlashInfer decode made
#   Llama-3.1-8B 8,431 out tok/s against Triton's 8,163 and Qwen3-0.6B 17,808 against 17,326.
# - prefill, which also runs the mixed steps of chunked prefill beside decodes: FA4 is the
#   fastest kernel (mixed step 409 us, Triton 480, FlashInfer 1,107; a 2k prompt 78, 153, 96
#   us), but only Triton's kernels are captured in the mixed-step CUDA graphs, and with FA4
#   running prefill the engine was slower end to end (Llama-3.1-8B 8,066, Qwen3-0.6B
#   16,942 out tok/s).
# Since then (2026-12-06, benchmarks/attention_tiles.py) Triton's decode kernel runs three
# pipeline stages, 2-3 % faster on an H100 and 5-9 % on an H200 at batch 256, and its prefill
# kernel skips masks on whole tiles: on an H100 a 2k prompt takes 107 us (153 before) and the
# mixed step 411 us (452 before; FA4's was 409). Later that day its decode took up to 32 splits
# at batch 1 and 2 (16 before): batch 1 at 32k context 50.9 us on an H100 (63.8 before;
# FlashInfer's 54.5 on 12-05), 8k 13.8 (15.5), 1k 6.7 (5.8); batch-1 TPOT at a 32k prompt, same
# machine, 7.76 ms against 8.20, FlashInfer 7.65 on another H100 machine. So small decode
# steps stay on Triton at any context. FlashInfer's prefill was not timed beside the new
# prefill kernel per operation; end to end it gave a 32k prompt 19 % less TTFT (1,246 against
# 1,531 ms on Triton's), which the rule for long steps without decode rows below now takes.
# Long prompts (2026-12-06, attention.py at block 128 on an H100): Triton's prefill attention
# at 8k tokens takes 1,548 us a layer, FlashInfer's 1,053 and FA4's 861 (a 2k prompt 107, 95,
# 69); no tile of attention_tiles.py closes the gap. A prefill step of more than
# AUTO_LONG_PREFILL_TOKENS new tokens and no decode rows is never in a CUDA graph (those stop
# at 2,048 tokens) and has no one-token rows, FlashInfer's slow case: "prefill_long" takes
# FlashInfer there, whose 32k-prompt TTFT was 19 % below Triton's end to end (above).
AUTO_RULES: dict[str, tuple[str, ...]] = {
    "decode": ("flashinfer", "triton"),
    "decode_small": ("triton",),
    "prefill": ("triton",),
    "prefill_long": ("flashinfer", "triton"),
}
AUTO_SMALL_DECODE_SEQS = 8
AUTO_LONG_PREFILL_TOKENS = 2048
AUTO_FALLBACK = "triton"


class AutoAttentionBackend(AttentionBackend):
    """Per operation, the first backend of `rules` that is installed and accepts the
    layer's shape, else AUTO_FALLBACK. The choice is made at the first use of each
    operation (when the shape is known) and logged; K/V are written by the fallback's
    kernel (every backend reads the same cache layout)."""

    name = "auto"
    supports_fp8_kv_cache = True
    supports_cuda_graphs = True  # the CUDA-graph runner asks for_op("decode") before capturing

    def __init__(self, rules: Optional[dict] = None):
        super().__init__()
        rules = AUTO_RULES if rules is None else rules
        self.fallback = get_attention_backend(AUTO_FALLBACK)
        self.candidates: dict[str, list[AttentionBackend]] = {}
        made: dict[str, AttentionBackend] = {AUTO_FALLBACK: self.fallback}
        for op in AUTO_OPS:
            self.candidates[op] = []
            for name in rules.get(op, ()):
                if name not in made:
                    try:
                        made[name] = get_attention_backend(name)
                    except ImportError as e:
                        logger.info("attention_backend auto: %s is not installed (%s)", name, e)
                        continue
                self.candidates[op].append(made[name])
        self.chosen: dict[str, AttentionBackend] = {}

    @staticmethod
    def rule(op: str, num_seqs: Optional[int], long_prefill: bool = False) -> str:
        """The AUTO_RULES entry of `op` over `num_seqs` sequences (`long_prefill`: a prefill
        step of more than AUTO_LONG_PREFILL_TOKENS new tokens, none of them a decode row)."""
        if op == "decode" and num_seqs is not None and num_seqs <= AUTO_SMALL_DECODE_SEQS:
            return "decode_small"
        if op == "prefill" and long_prefill:
            return "prefill_long"
        return op

    @staticmethod
    def is_long_prefill(meta: AttentionMetadata) -> bool:
        lens = meta.query_lens_cpu
        return meta.op == "prefill" and min(lens) > 1 and sum(lens) > AUTO_LONG_PREFILL_TOKENS

    def choose(self, op: str, shape: AttentionShape, num_seqs: Optional[int] = None,
               long_prefill: bool = False) -> AttentionBackend:
        """The backend for `op` over `num_seqs` sequences at `shape` (decided once per rule)."""
        key = self.rule(op, num_seqs, long_prefill)
        backend = self.chosen.get(key)
        if backend is None:
            backend = self.fallback
            for candidate in self.candidates[key]:
                reason = candidate.refusal(op, shape)
                if reason is None:
                    backend = candidate
                    break
                logger.info("attention_backend auto: %s refuses %s at %s: %s",
                            candidate.name, op, shape.describe(), reason)
            what = {"decode_small": f"decode steps of at most {AUTO_SMALL_DECODE_SEQS} sequences",
                    "decode": f"decode steps of more than {AUTO_SMALL_DECODE_SEQS} sequences",
                    "prefill_long": f"prefill steps of more than {AUTO_LONG_PREFILL_TOKENS} new tokens "
                                    "without decode rows"}.get(key, key)
            logger.info("attention_backend auto: %s runs %s", backend.name, what)
            self.chosen[key] = backend
        return backend

    def for_op(self, op: str, num_seqs: Optional[int] = None) -> AttentionBackend:
        return self.chosen.get(self.rule(op, num_seqs), self.fallback)

    def memory_reserve_bytes(self, *args) -> int:
        """Every backend it may choose: the choice is made after the KV cache is sized."""
        made = {id(b): b for bs in self.candidates.values() for b in bs}
        made[id(self.fallback)] = self.fallback
        return sum(b.memory_reserve_bytes(*args) for b in made.values())

    def refusal(self, op, shape):
        return self.choose(op, shape).refusal(op, shape)

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        self.fallback.write_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)

    def rotary_write_kv(self, *args, **kwargs):
        return self.fallback.rotary_write_kv(*args, **kwargs)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale, k_scale=1.0, v_scale=1.0):
        op, long_prefill = meta.op, self.is_long_prefill(meta)
        backend = (self.chosen.get(self.rule(op, meta.num_seqs, long_prefill))
                   or self.choose(op, AttentionShape.of(q, kv_cache), meta.num_seqs, long_prefill))
        return backend.attend(q, kv_cache, meta, scale, k_scale, v_scale)
