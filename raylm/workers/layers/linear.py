"""Linear layers that shard across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that copies
this rank's slice of a full checkpoint tensor, so sharding lives next to the layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylm.workers.parallel_state import all_gather_last_dim, all_reduce, get_tp_rank, get_tp_size


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by tensor_parallel_size {denominator}")
    return numerator // denominator


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"weight shape {tuple(loaded_weight.shape)} does not match "
                         f"parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks (output stays sharded
    unless `gather_output`)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "output size")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        default_weight_loader(param, loaded_weight.narrow(0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix
    (gate_proj and up_proj); each is sharded on its own."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: Optional[torch.dtype] = None):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        assert shard_id is not None, "merged linear needs a shard_id"
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        src = loaded_weight.narrow(0, self.tp_rank * shard_size, shard_size)
        default_weight_loader(param.data.narrow(0, offset, shard_size), src)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one matrix. Each rank holds num_heads/tp query heads and
    num_kv_heads/tp kv heads; with fewer kv heads than ranks, kv heads are replicated."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False, dtype: Optional[torch.dtype] = None):
        tp = get_tp_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        if total_num_kv_heads >= tp:
            self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp, total_num_kv_heads, "tensor_parallel_size / num_key_value_heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp * head_size
        super().__init__(hidden_size, output_size, bias=bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        hs = self.head_size
        q_size, kv_size = self.num_heads * hs, self.num_kv_heads * hs
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size = kv_size
            start = (self.tp_rank // self.kv_replicas) * kv_size
        else:
            raise ValueError(f"unknown qkv shard_id {shard_id!r}")
        default_weight_loader(param.data.narrow(0, offset, size), loaded_weight.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial sums are
    all-reduced. The bias is added once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_partition = divide(input_size, self.tp_size, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        size = param.shape[1]
        default_weight_loader(param, loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp_size > 1:
            y = all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
