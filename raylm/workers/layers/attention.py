"""One layer's attention over its paged KV cache. The backends, the metadata they read
and their registry are in raylm.workers.attention_backends; the runner picks a backend
and passes it, with the step's metadata, through `forward`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raylm.workers.attention_backends import AttentionBackend, AttentionMetadata  # noqa: F401


class Attention(nn.Module):
    """One layer's attention over its paged KV cache. The runner assigns `kv_cache`
    ([2, num_blocks, block_size, num_kv_heads, head_dim]).

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

    def forward(self, q, k, v, meta: AttentionMetadata, backend: AttentionBackend,
                rotary=None, positions=None):
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]. With `rotary` (a RotaryEmbedding)
        q and k are rotated at `positions` first, fused with the cache write where the
        backend can (AttentionBackend.rotary_write_kv)."""
        assert self.kv_cache is not None, "KV cache not allocated"
        if rotary is not None:
            q = backend.rotary_write_kv(rotary, positions, q, k, v, self.kv_cache, meta.slot_mapping,
                                        self.k_scale, self.v_scale)
        else:
            backend.write_kv(k, v, self.kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = backend.attend(q, self.kv_cache, meta, self.scale, self.k_scale, self.v_scale)
        return out.reshape(q.shape[0], -1)
