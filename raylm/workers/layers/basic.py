"""Small layers: RMSNorm (with fused residual add), SiLU-and-mul, and vocab-parallel
embedding / LM head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylm.workers.layers.linear import default_weight_loader, divide, linear
from raylm.workers.parallel_state import all_reduce, gather_last_dim, get_tp_rank, get_tp_size


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like transformers. With `residual`,
    adds it first and returns (normed, new_residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if x.is_cuda:  # one fused Triton kernel: residual add + norm
            from raylm.kernels.norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class SiluAndMul(nn.Module):
    """silu(gate) * up for the concatenated [gate, up] projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from raylm.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks; each rank looks up its
    own range and the partial results are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        # Pad so the vocabulary divides evenly; padded rows are zero and never chosen.
        self.vocab_size_padded = -(-vocab_size // self.tp_size) * self.tp_size
        self.shard_size = divide(self.vocab_size_padded, self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {loaded_weight.shape[0]} rows; vocab_size is {self.vocab_size}")
        size = min(self.shard_size, self.vocab_size - self.vocab_start)
        param.data[:size].copy_(loaded_weight.narrow(0, self.vocab_start, size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.shard_size)
        out = F.embedding(torch.where(mask, local, 0), self.weight)
        out = out * mask.unsqueeze(-1).to(out.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, split by vocabulary rows across ranks. With
    TP the full logits are gathered on rank 0 only; other ranks get None."""

    def forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:  # type: ignore[override]
        logits = linear(hidden, self.weight)
        if self.tp_size > 1:
            # Only rank 0 samples: a gather moves 1/tp of an all-gather's bytes.
            logits = gather_last_dim(logits, dst=0)
            if logits is None:
                return None
        return logits[..., :self.vocab_size]
