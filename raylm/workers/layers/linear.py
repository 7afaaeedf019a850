"""Linear layers that shard across tensor-parallel ranks, dense or quantized.

A layer's parameters come from its linear method (dense by default; a quantization
method registers packed weights, scales, zero points, ...). Every parameter says which of
its dims is the layer's output dim and which its input dim (`output_dim`, `input_dim`),
and whether one of them is packed (`packed_dim`, `pack_factor` values per element), so one
`weight_loader(param, loaded_weight, shard_id=None)` per layer copies this rank's slice of
any full checkpoint tensor: sharding lives next to the layer.
"""
from __future__ import annotations

import os
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


def set_dims(param: nn.Parameter, output_dim: Optional[int], input_dim: Optional[int],
             packed_dim: Optional[int] = None, pack_factor: int = 1) -> nn.Parameter:
    param.output_dim, param.input_dim = output_dim, input_dim
    param.packed_dim, param.pack_factor = packed_dim, pack_factor
    return param


def _along(param, dim: int, size: int) -> int:
    """`size` logical elements along `dim` of `param`, in stored elements."""
    if getattr(param, "packed_dim", None) == dim:
        return size // param.pack_factor
    return size


# One-row products (decode at batch 1) on raylm's Triton GEMV, 2 rows a program in 2048-wide
# chunks (8 warps, 2 stages), which beat cuBLAS at every Llama-3.1-8B shape on an H100
# (benchmarks/gemv.py, CUDA graphs, 2026-12-06): qkv 6144 x 4096 18.4 against 20.5 us,
# o_proj 4096 x 4096 13.0 against 15.7, gate_up 28672 x 4096 76.0 against 82.2, down
# 4096 x 14336 40.1 against 43.6, the LM head 128256 x 4096 329 against 374. Taken where
# both sides are at least 4096, on Hopper (SM 9.x): the range and the GPUs measured.
# RAYLM_TRITON_GEMV=0 turns it off.
TRITON_GEMV = os.environ.get("RAYLM_TRITON_GEMV", "1") != "0"
GEMV_MIN_DIM = 4096
GEMV_TILES = {"block_n": 2, "block_k": 2048, "num_warps": 8, "num_stages": 2}
# The gate/up GEMV with SiLU-and-mul as its epilogue (rows r and I + r in one program).
GEMV_SILU = os.environ.get("RAYLM_GEMV_SILU", "1") != "0"
GEMV_SILU_TILES = {"block_n": 1, "block_k": 2048, "num_warps": 8, "num_stages": 2}


def gemv_wins(n: int, k: int) -> bool:
    """Whether a one-row product with an [n, k] weight goes to the Triton GEMV."""
    return n >= GEMV_MIN_DIM and k >= GEMV_MIN_DIM


_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T goes to the Triton GEMV: a single row of x on a Hopper GPU with
    a bf16/fp16 weight of a shape in gemv_wins."""
    return (TRITON_GEMV and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and weight.dtype in _GEMV_DTYPES
            and x.dtype == weight.dtype and weight.stride(1) == 1 and gemv_wins(*weight.shape)
            and torch.cuda.get_device_capability(x.device)[0] == 9)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, or the Triton GEMV (raylm.kernels.gemv) where takes_gemv."""
    if takes_gemv(x, weight):
        from raylm.kernels.gemv import gemv

        return gemv(x, weight, bias, **GEMV_TILES)
    return F.linear(x, weight, bias)


def gate_up_silu(x: torch.Tensor, layer: "MergedColumnParallelLinear") -> Optional[torch.Tensor]:
    """silu(gate) * up of a dense [gate; up] projection with no bias in one launch (the GEMV
    with SiLU-and-mul as its epilogue, raylm.kernels.gemv.gemv_silu_mul) where the product
    takes_gemv; None elsewhere, where the caller runs the projection and SiluAndMul.
    RAYLM_GEMV_SILU=0: never."""
    if not (GEMV_SILU and isinstance(layer.quant_method, UnquantizedLinearMethod) and layer.bias is None
            and not layer.gather_output and len(layer.output_sizes) == 2
            and layer.output_sizes[0] == layer.output_sizes[1] and takes_gemv(x, layer.weight)):
        return None
    from raylm.kernels.gemv import gemv_silu_mul

    return gemv_silu_mul(x, layer.weight, **GEMV_SILU_TILES)


class UnquantizedLinearMethod:
    """Dense weight [out, in] (and bias [out])."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        layer.weight = set_dims(nn.Parameter(torch.empty(output_size, input_size, dtype=dtype),
                                             requires_grad=False), 0, 1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear(x, layer.weight, bias)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass


class LinearBase(nn.Module):
    """Holds this rank's [input_size_per_partition -> output_size_per_partition] share."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype, quant_config, prefix: str,
                 input_per_partition: int, output_per_partition: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_per_partition
        self.output_size_per_partition = output_per_partition
        self.prefix = prefix
        method = quant_config.get_linear_method(self, prefix) if quant_config is not None else None
        self.quant_method = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_per_partition, output_per_partition, dtype)
        for p in self.parameters(recurse=False):
            if not hasattr(p, "weight_loader"):  # a method may bring its own (per-shard scales)
                p.weight_loader = self.weight_loader
        if bias:
            self.bias = set_dims(nn.Parameter(torch.empty(self.bias_size(), dtype=dtype),
                                              requires_grad=False), 0, None)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def bias_size(self) -> int:
        return self.output_size_per_partition

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W's output rows split across ranks (output stays sharded
    unless `gather_output`)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False, dtype: Optional[torch.dtype] = None,
                 quant_config=None, prefix: str = ""):
        tp = get_tp_size()
        self.gather_output = gather_output
        super().__init__(input_size, output_size, bias, dtype, quant_config, prefix,
                         input_size, divide(output_size, tp, "output size"))

    def _load_out_slice(self, param, loaded_weight, start: int, size: int, dst_offset: int) -> None:
        """Copy logical output rows [start, start+size) of the checkpoint tensor into this
        parameter at logical output offset `dst_offset`; other dims copied whole."""
        dim = param.output_dim
        src = loaded_weight.narrow(dim, _along(param, dim, start), _along(param, dim, size))
        dst = param.data.narrow(dim, _along(param, dim, dst_offset), _along(param, dim, size))
        default_weight_loader(dst, src)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if getattr(param, "output_dim", None) is None:
            return default_weight_loader(param, loaded_weight)  # replicated (e.g. g_idx)
        size = self.output_size_per_partition
        self._load_out_slice(param, loaded_weight, self.tp_rank * size, size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        return all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix
    (gate_proj and up_proj); each is sharded on its own."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: Optional[torch.dtype] = None, quant_config=None, prefix: str = ""):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype,
                         quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if getattr(param, "output_dim", None) is None:
            return default_weight_loader(param, loaded_weight)  # shared by the shards (g_idx)
        assert shard_id is not None, "merged linear needs a shard_id"
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._load_out_slice(param, loaded_weight, self.tp_rank * shard_size, shard_size, offset)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one matrix. Each rank holds num_heads/tp query heads and
    num_kv_heads/tp kv heads; with fewer kv heads than ranks, kv heads are replicated."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False, dtype: Optional[torch.dtype] = None,
                 quant_config=None, prefix: str = ""):
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
        super().__init__(hidden_size, output_size, bias=bias, dtype=dtype,
                         quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if getattr(param, "output_dim", None) is None:
            return default_weight_loader(param, loaded_weight)
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
        self._load_out_slice(param, loaded_weight, start, size, offset)


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W's input columns split across ranks; partial sums are
    all-reduced. The bias is added once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, quant_config=None, prefix: str = ""):
        tp = get_tp_size()
        super().__init__(input_size, output_size, bias, dtype, quant_config, prefix,
                         divide(input_size, tp, "input size"), output_size)

    def bias_size(self) -> int:
        return self.output_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        dim = getattr(param, "input_dim", None)
        if dim is None or param is self.bias:
            return default_weight_loader(param, loaded_weight)
        # Stored rows per rank along the input dim (packed ints, groups of scales, g_idx):
        # this rank's slice is its equal share of the checkpoint tensor.
        size = param.shape[dim]
        default_weight_loader(param, loaded_weight.narrow(dim, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x)
        if self.tp_size > 1:
            y = all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
