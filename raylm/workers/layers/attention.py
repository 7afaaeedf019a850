"""Paged attention: the metadata a step carries, the backend interface, and the
plain PyTorch backend (the reference, and the CPU path).

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim].
Token t of a sequence lives in block `block_table[t // block_size]` at offset
`t % block_size`; `slot_mapping` gives each new token's flat slot
(block_id * block_size + offset).

kv_cache_dtype="fp8" stores the cache as float8_e4m3fn: x is written as
clamp(x / scale, +-448) cast to e4m3 and read back as float(x_fp8) * scale, with one
float scale for K and one for V per layer (Attention.k_scale / v_scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# The one definition of how a value is stored in the cache, shared with the Triton KV
# write's reference (IEEE division by the scale, clamp to +-448, then the cast).
from raylm.kernels.kv_cache import quantize_kv

FP8_KV_DTYPE = torch.float8_e4m3fn


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache contents in `dtype` (the query's): float(x) * scale for fp8."""
    if x.dtype == FP8_KV_DTYPE:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend:
    """Writes new K/V into the paged cache and attends each query to its sequence's
    cached prefix plus itself (causal). With an fp8 cache, K and V are stored divided by
    k_scale / v_scale; backends that cannot read one leave `supports_fp8_kv_cache` False."""

    name = "base"
    supports_fp8_kv_cache = False

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


class TorchAttentionBackend(AttentionBackend):
    """Reference backend: gather each sequence's K/V through its block table, then
    scaled-dot-product attention with a causal offset. GQA by repeating kv heads. An fp8
    cache is quantized on write and dequantized to the query's dtype on read."""

    name = "torch"
    supports_fp8_kv_cache = True

    def write_kv(self, k, v, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = quantize_kv(k, kv_cache.dtype, k_scale)
        kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = quantize_kv(v, kv_cache.dtype, v_scale)

    def attend(self, q, kv_cache, meta, scale, k_scale=1.0, v_scale=1.0):
        block_size = kv_cache.shape[2]
        num_heads = q.shape[1]
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            num_blocks = -(-seq_len // block_size)
            blocks = meta.block_tables[i, :num_blocks].long()
            k = dequantize_kv(kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len],
                              q.dtype, k_scale)
            v = dequantize_kv(kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len],
                              q.dtype, v_scale)
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            qi = q[starts[i]:starts[i] + q_len]
            mask = None
            if q_len > 1:
                # Query j sits at position seq_len - q_len + j and sees keys up to it.
                qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                kpos = torch.arange(seq_len, device=q.device)
                mask = kpos[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask, scale=scale)
            out[starts[i]:starts[i] + q_len] = o.transpose(0, 1)
        return out


_BACKENDS = {"torch": TorchAttentionBackend}


def register_backend(name: str, cls) -> None:
    _BACKENDS[name] = cls


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        # Registration happens on import; a Ray worker process may not have imported the
        # module the driver did, so look there before giving up.
        try:
            import raylm.workers.attention_backends  # noqa: F401
        except ImportError:
            pass
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not available; "
                         f"choose from {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


class Attention(nn.Module):
    """One layer's attention over its paged KV cache. The runner assigns `kv_cache`
    and passes the step's metadata and backend through `forward`.

    k_scale / v_scale scale an fp8 KV cache (stored = x / scale). Without calibrated scales
    in the checkpoint they are 1.0, vLLM's default; they are plain per-layer floats so a
    loader can set calibrated ones later (CUDA graphs bake them in at capture)."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.kv_cache: Optional[torch.Tensor] = None
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q, k, v, meta: AttentionMetadata, backend: AttentionBackend):
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]."""
        assert self.kv_cache is not None, "KV cache not allocated"
        backend.write_kv(k, v, self.kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = backend.attend(q, self.kv_cache, meta, self.scale, self.k_scale, self.v_scale)
        return out.reshape(q.shape[0], -1)
