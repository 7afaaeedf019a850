"""Tensor-parallel rank, world size and process group of this process (rank 0 of 1
without TP), the collectives the layers use, and (when asked for) a CPU gloo group
beside the TP group on which rank 0 broadcasts byte messages (step plans) to the others.

`init_tensor_parallel` joins a torch.distributed group (gloo on CPU, nccl on CUDA);
layers read the rank and size when they are constructed, so call it before building
the model."""
from __future__ import annotations

import contextlib
import struct
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP = None
_CPU_GROUP = None  # gloo, for broadcast_bytes
# broadcast_bytes sends a fixed head of this many bytes (an 8-byte length, then the
# message); a longer message sends the rest in a second broadcast.
MESSAGE_HEAD_BYTES = 4096


def set_tensor_parallel(rank: int, size: int, group=None) -> None:
    global _TP_RANK, _TP_SIZE, _TP_GROUP
    _TP_RANK, _TP_SIZE, _TP_GROUP = rank, size, group


@contextlib.contextmanager
def single_rank():
    """Within: as without tensor parallelism (rank 0 of 1), for a model that lives on TP
    rank 0 alone (a draft model at draft_tensor_parallel_size 1). Its layers built here
    hold whole weights, and its forward passes run here make no collective call. Call it
    on rank 0 only."""
    global _TP_RANK, _TP_SIZE
    saved = _TP_RANK, _TP_SIZE
    _TP_RANK, _TP_SIZE = 0, 1
    try:
        yield
    finally:
        _TP_RANK, _TP_SIZE = saved


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def get_tp_group():
    return _TP_GROUP


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device_type: str,
                         timeout_s: float = 600.0, cpu_group_timeout_s: Optional[float] = None) -> None:
    """Join the process group at `init_method` (e.g. tcp://127.0.0.1:29500) and make all
    of its ranks this process's tensor-parallel group; its collectives fail after
    `timeout_s`. With `cpu_group_timeout_s` every rank must pass one: a gloo group
    beside it carries `broadcast_bytes`, each rank waiting at most its own timeout."""
    global _CPU_GROUP
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    # Its own group rather than WORLD, so a later pipeline-parallel split only changes this.
    group = dist.new_group(list(range(world_size)), timeout=timeout)
    if cpu_group_timeout_s is not None:
        _CPU_GROUP = dist.new_group(list(range(world_size)), backend="gloo",
                                    timeout=timedelta(seconds=cpu_group_timeout_s))
    set_tensor_parallel(rank, world_size, group)


def destroy_tensor_parallel() -> None:
    """Leave the process group (if any) and go back to rank 0 of 1."""
    global _CPU_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None
    set_tensor_parallel(0, 1, None)


def broadcast_bytes(message: Optional[bytes] = None) -> bytes:
    """Rank 0 passes `message`, the other ranks nothing; every rank returns rank 0's
    message. One gloo broadcast of MESSAGE_HEAD_BYTES when it fits, two otherwise.
    Raises if a rank is gone (its connection closed) or past the group's timeout."""
    if _CPU_GROUP is None:
        raise RuntimeError("no message group: init_tensor_parallel(..., cpu_group_timeout_s=...) makes one")
    return _broadcast_message(message, _CPU_GROUP, None)


def broadcast_from_first_bytes(message: Optional[bytes], device) -> bytes:
    """broadcast_bytes on the tensor-parallel group itself (tensors on `device`), so the
    message keeps its place among the group's other collectives; on a GPU the message
    crosses to the host (a device sync). Without TP: `message`."""
    if _TP_SIZE == 1:
        return message
    return _broadcast_message(message, _TP_GROUP, device)


def _broadcast_message(message: Optional[bytes], group, device) -> bytes:
    """Rank 0's `message` to every rank of `group`: a head of MESSAGE_HEAD_BYTES (an
    8-byte length, then the message), and the rest in a second broadcast when it does
    not fit. `device`: where the tensors go (None: the host, for a gloo group)."""
    src = dist.get_global_rank(group, 0)

    def send(buf: bytearray):
        t = torch.frombuffer(buf, dtype=torch.uint8)
        if device is None or torch.device(device).type == "cpu":
            dist.broadcast(t, src=src, group=group)  # in place, into buf
            return buf
        t = t.to(device)
        dist.broadcast(t, src=src, group=group)
        return t.cpu().numpy().tobytes()

    head = bytearray(MESSAGE_HEAD_BYTES)
    room = MESSAGE_HEAD_BYTES - 8
    if _TP_RANK == 0:
        struct.pack_into("<q", head, 0, len(message))
        head[8:8 + min(room, len(message))] = message[:room]
    got = send(head)
    (length,) = struct.unpack_from("<q", got, 0)
    if length <= room:
        return message if _TP_RANK == 0 else bytes(got[8:8 + length])
    rest = send(bytearray(message[room:]) if _TP_RANK == 0 else bytearray(length - room))
    return message if _TP_RANK == 0 else bytes(got[8:]) + bytes(rest)


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
