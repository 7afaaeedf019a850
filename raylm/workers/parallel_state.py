"""Tensor-parallel rank, world size and process group of this process (rank 0 of 1
without TP), and the three collectives the layers use.

`init_tensor_parallel` joins a torch.distributed group (gloo on CPU, nccl on CUDA);
layers read the rank and size when they are constructed, so call it before building
the model."""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP = None


def set_tensor_parallel(rank: int, size: int, group=None) -> None:
    global _TP_RANK, _TP_SIZE, _TP_GROUP
    _TP_RANK, _TP_SIZE, _TP_GROUP = rank, size, group


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def get_tp_group():
    return _TP_GROUP


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device_type: str,
                         timeout_s: float = 600.0) -> None:
    """Join the process group at `init_method` (e.g. tcp://127.0.0.1:29500) and make all
    of its ranks this process's tensor-parallel group."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    # Its own group rather than WORLD, so a later pipeline-parallel split only changes this.
    group = dist.new_group(list(range(world_size)))
    set_tensor_parallel(rank, world_size, group)


def destroy_tensor_parallel() -> None:
    """Leave the process group (if any) and go back to rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    set_tensor_parallel(0, 1, None)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (a no-op without TP)."""
    if _TP_SIZE > 1:
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Give every rank rank 0's `x` (in place; a no-op without TP)."""
    if _TP_SIZE > 1:
        dist.broadcast(x, src=dist.get_global_rank(_TP_GROUP, 0), group=_TP_GROUP)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension, in rank order."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)


def gather_last_dim(x: torch.Tensor, dst: int = 0) -> Optional[torch.Tensor]:
    """Like `all_gather_last_dim`, but only rank `dst` receives the result (others get
    None): the LM head's logits are only needed where sampling happens."""
    if _TP_SIZE == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)] if _TP_RANK == dst else None
    dist.gather(x, parts, dst=dist.get_global_rank(_TP_GROUP, dst), group=_TP_GROUP)
    return torch.cat(parts, dim=-1) if parts is not None else None
