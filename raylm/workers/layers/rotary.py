"""Rotary position embedding (rotate-half layout), plain or with Llama 3.1 scaling.

cos/sin are precomputed for every position up to max_position in float32 exactly as
transformers computes them, then indexed by each token's position."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def rope_parameters(config) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from a transformers 4 (`rope_theta` +
    `rope_scaling`) or transformers 5 (`rope_parameters`) config."""
    params = getattr(config, "rope_parameters", None)
    scaling = getattr(config, "rope_scaling", None)
    theta = getattr(config, "rope_theta", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones
    kept, a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type != "llama3":
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: llama3")
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        # Every layer has the same table: build it once per (shape, device) and share it
        # (a 128k-position table is 134 MB; one per layer would cost gigabytes).
        device = torch.empty(0).device  # the device the model is being built under
        key = (head_dim, max_position, theta, repr(sorted((scaling or {}).items())), str(device))
        if key not in _TABLES:
            t = torch.arange(max_position, dtype=torch.int64).float()
            freqs = t[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1).to(device)
            _TABLES[key] = (emb.cos(), emb.sin())
        cos, sin = _TABLES[key]
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D] -> rotated (same dtypes). On CUDA q and k are
        rotated in place by one Triton kernel."""
        if q.is_cuda:
            from raylm.kernels.rotary import rotary_embedding

            rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        return q, k
