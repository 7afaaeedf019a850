"""Online quantization of a dense checkpoint (engine argument `quantization="fp8"` or
`"int8"`): layers load the dense weight as usual, then `process_weights_after_loading`
replaces it by an 8-bit copy with one scale per output channel and frees it.

- "fp8": float8_e4m3fn weights, scale = amax / 448 per output row; activations dynamic
  per token, scale = max(amax, 1e-10) / 448 (vLLM's per_token_group_quant_fp8 with one
  group). Note vLLM's own online fp8 uses one per-tensor weight scale; per channel is
  never less accurate and runs through the same row-wise _scaled_mm.
- "int8": symmetric int8 weights, scale = amax / 127 per output row, q = round(w / scale)
  (half to even); activations dynamic per token with vLLM's convention
  (dynamic_scaled_int8_quant: scale = amax / 127, q = round(x * 127 / amax)), as vLLM
  serves compressed-tensors W8A8-int8 (see raylm.kernels.quant_act).
"Per token" and "per output row" mean whole rows: a row-parallel shard takes its scales
from the row's amax over all ranks (a small MAX all-reduce; per forward for activations),
so results don't change with tensor_parallel_size.
An all-zero weight row gets scale 1 (q = 0), so it dequantizes to exactly 0.

Layer after loading: weight fp8/int8 [N, K] (nn.Linear's layout), weight_scale float32 [N].
CPU path: quantize-dequantize both operands and matmul in float32; GPU path:
quant_gemm.fp8_gemm / w8a8_int8_gemm on the 8-bit tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raylm.workers.layers.linear import set_dims
from raylm.workers.parallel_state import get_tp_group
from raylm.workers.quantization.base import QuantConfig

QMAX = {"fp8": 448.0, "int8": 127.0}
QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


class OnlineQuantConfig(QuantConfig):
    """Every decoder linear quantized at load time (the LM head and embeddings stay dense)."""

    def __init__(self, quantization: str):
        if quantization not in QMAX:
            raise ValueError(f"quantization {quantization!r} is not an online scheme; supported: {sorted(QMAX)}")
        super().__init__()
        self.name = quantization

    def get_linear_method(self, layer, prefix: str):
        return None if self.is_skipped(prefix) else OnlineQuantLinearMethod(self.name)


def quantize_weight(w: torch.Tensor, scheme: str, amax: Optional[torch.Tensor] = None):
    """Dense [N, K] -> (q [N, K] fp8 or int8, scale float32 [N]), symmetric per output row
    (amax [N, 1] if given, else each row's own)."""
    wf = w.float()
    if amax is None:
        amax = wf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX[scheme], torch.ones_like(amax))
    v = wf / scale
    if scheme == "int8":
        q = torch.round(v).clamp(-128, 127).to(torch.int8)
    else:
        q = v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale.squeeze(1)


def row_amax(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The amax [rows, 1] of each whole row of `x` (tokens, or weight rows) when this rank
    holds only a slice of the input dim (a row-parallel shard): a MAX all-reduce over
    ranks, so scales and results don't depend on tensor_parallel_size (vLLM scales each
    rank's slice on its own). None when the rank holds whole rows."""
    if layer.input_size_per_partition == layer.input_size or layer.tp_size == 1:
        return None
    amax = x.abs().amax(-1, keepdim=True).float()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=get_tp_group())
    return amax


def quantize_activation(x: torch.Tensor, scheme: str, amax: Optional[torch.Tensor] = None):
    """x [M, K] -> (q, scale float32 [M, 1]), dynamic per token (amax [M, 1] if given,
    else each row's own). The Triton kernels on a GPU; in PyTorch, with the same
    formulas as their references (quant_act), on CPU or with a given amax."""
    from raylm.kernels.quant import act as quant_act

    if x.is_cuda and amax is None:
        if scheme == "int8":
            return quant_act.per_token_quant_int8(x, "vllm")
        return quant_act.per_token_quant_fp8(x)
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax(-1, keepdim=True)
    if scheme == "int8":  # vLLM: scale = amax / 127, q = round(x * (127 / amax)), 0 for a zero row
        inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
        return torch.round((xf * inv).clamp(-128, 127)).to(torch.int8), amax / torch.full_like(amax, 127.0)
    scale = amax.clamp(min=quant_act.FP8_EPS) / torch.full_like(amax, quant_act.FP8_MAX)
    return (xf / scale).clamp(-quant_act.FP8_MAX, quant_act.FP8_MAX).to(torch.float8_e4m3fn), scale


class OnlineQuantLinearMethod:
    def __init__(self, scheme: str):
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        layer.weight = set_dims(nn.Parameter(torch.empty(output_size, input_size, dtype=dtype),
                                             requires_grad=False), 0, 1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.weight.data
        q, scale = quantize_weight(w, self.scheme, row_amax(layer, w))
        del w, layer.weight  # the dense copy goes once nothing else holds it
        layer.weight = set_dims(nn.Parameter(q, requires_grad=False), 0, 1)
        layer.weight_scale = set_dims(nn.Parameter(scale, requires_grad=False), 0, None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        from raylm.kernels import quant as quant_gemm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_activation(x2, self.scheme, row_amax(layer, x2))
        if x.is_cuda:
            gemm = quant_gemm.fp8_gemm if self.scheme == "fp8" else quant_gemm.w8a8_int8_gemm
            y = gemm(xq, xs, layer.weight, layer.weight_scale, bias, out_dtype=x.dtype)
        else:
            # CPU: the same arithmetic in float32, both operands dequantized.
            w = layer.weight.float() * layer.weight_scale.unsqueeze(1)
            y = F.linear(xq.float() * xs, w, None if bias is None else bias.float()).to(x.dtype)
        return y.reshape(*shape[:-1], -1)
