"""HF fine-grained fp8 checkpoints (`quant_method: "fp8"`, as written by transformers'
FineGrainedFP8Config, DeepSeek-V3 and auto-round's fp8 export): float8_e4m3fn weights
with one scale per [bn, bk] block and dynamic fp8 activations per group of bk channels.

Stored per layer: weight float8_e4m3fn [N, K] and weight_scale_inv [ceil(N / bn),
ceil(K / bk)], (bn, bk) = quantization_config.weight_block_size. Despite the name, the
scale is multiplied: w[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]
(transformers' integrations/finegrained_fp8.py, Fp8Dequantize and
_dequantize_fp8_weight). A last partial block (N or K not a multiple of the block, e.g.
the tiny test model's 64-row k/v projections) has its own scale.

Activations (activation_scheme "dynamic"), as vLLM's per_token_group_quant_fp8: each
token's channels in groups of bk, scale = max(amax, 1e-10) / 448 (raylm.kernels.quant_act).

The layer keeps the block scales expanded over rows, `weight_scale_inv` [N, ceil(K / bk)]
float32 (one row per output channel; 4 / bk bytes per weight byte; stored group-major
after loading, see process_weights_after_loading): then a tensor-parallel
or fused (qkv, gate_up) output split at any row, partial blocks included, is the same row
split as the weight's. Input splits (row-parallel layers) must fall on block boundaries.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylm.workers.layers.linear import ColumnParallelLinear, set_dims
from raylm.workers.quantization.base import QuantConfig


class FP8Config(QuantConfig):
    name = "fp8"

    def __init__(self, weight_block_size: tuple[int, int], modules_to_not_convert=None):
        super().__init__(modules_to_not_convert)
        self.block_n, self.block_k = weight_block_size

    @classmethod
    def from_config(cls, cfg: dict) -> "FP8Config":
        scheme = cfg.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported; "
                             f"supported: 'dynamic'")
        block = cfg.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"quantization_config.weight_block_size {block!r} is not supported; "
                             f"supported: two positive integers [block_n, block_k] (per-tensor "
                             f"fp8 checkpoints are not supported)")
        fmt = cfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt {fmt!r} is not supported; supported: 'e4m3'")
        return cls(tuple(block), cfg.get("modules_to_not_convert"))

    def get_linear_method(self, layer, prefix: str):
        return None if self.is_skipped(prefix) else FP8BlockLinearMethod(self)


def quant_dequant_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] through dynamic per-token-group fp8 (scale = max(amax, 1e-10) / 448 per
    `group_size` channels, a last partial group on its own) and back, in float32."""
    from raylm.kernels import quant as quant_gemm
    from raylm.kernels.quant import act as quant_act

    k = x.shape[-1]
    pad = -k % group_size
    xp = F.pad(x.float(), (0, pad)) if pad else x.float()  # zeros leave each amax unchanged
    q, scale = quant_act.per_token_quant_fp8_ref(xp, group_size)
    return quant_gemm.dequantize_groups(q, scale, group_size)[..., :k]


class FP8BlockLinearMethod:
    def __init__(self, config: FP8Config):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        bk = self.config.block_k
        if input_size != layer.input_size and input_size % bk:
            raise ValueError(f"{layer.prefix}: input size per tensor-parallel rank {input_size} "
                             f"(of {layer.input_size}) is not a multiple of "
                             f"quantization_config.weight_block_size[1] {bk}: each rank must hold "
                             f"whole fp8 blocks; use a smaller tensor_parallel_size")
        layer.weight = set_dims(nn.Parameter(torch.empty(output_size, input_size, dtype=torch.float8_e4m3fn),
                                             requires_grad=False), 0, 1)
        scale = torch.empty(output_size, -(-input_size // bk), dtype=torch.float32)
        layer.weight_scale_inv = set_dims(nn.Parameter(scale, requires_grad=False), 0, 1)
        layer.weight_scale_inv.weight_loader = self._scale_loader(layer)

    def _scale_loader(self, layer: nn.Module):
        bn = self.config.block_n

        def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            # One row per output channel; the layer's loader then takes its rows as a weight's.
            rows = loaded_weight.float().repeat_interleave(bn, dim=0)
            if not isinstance(layer, ColumnParallelLinear):
                rows = rows[: layer.output_size]  # output not split: drop the last block's padding
            layer.weight_loader(param, rows, shard_id)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # Group-major scales (same [N, G] shape, row stride 1): the block-scaled GEMM then
        # reads each K step's scales for a tile's rows in one coalesced load.
        scale = layer.weight_scale_inv.data
        layer.weight_scale_inv.data = scale.t().contiguous().t()
        # cuBLAS's layout of the same 128x128 blocks, for large batches (quant_gemm.fp8_block_gemm)
        layer.weight_blocks = None
        c = self.config
        n, k = layer.weight.shape
        if scale.is_cuda and (c.block_n, c.block_k) == (128, 128) and n % 128 == 0 and k % 128 == 0:
            from raylm.kernels.quant import block_scales_for_cublas

            layer.weight_blocks = block_scales_for_cublas(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        bk = self.config.block_k
        if x.is_cuda and bk % 16 == 0:  # the kernel's K steps are multiples of 16
            return _apply_cuda(layer, x, bias, bk)
        # CPU: block-dequantize the weight and quantize-dequantize the activations in float32.
        from raylm.kernels import quant as quant_gemm

        # row-expanded block scales [N, ceil(K / bk)]: one scale per bk channels of a row
        w = quant_gemm.dequantize_groups(layer.weight, layer.weight_scale_inv, bk)
        y = F.linear(quant_dequant_groups(x, bk), w, None if bias is None else bias.float())
        return y.to(x.dtype)


def _apply_cuda(layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], bk: int) -> torch.Tensor:
    """Per-token-group fp8 activations, then one block-scaled fp8 GEMM (Triton,
    quant_gemm.fp8_block_gemm: each bk-wide K slice scaled as it is accumulated in float32)."""
    from raylm.kernels import quant as quant_gemm
    from raylm.kernels.quant import act as quant_act

    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    pad = -k % bk
    w = layer.weight
    if pad:  # a last partial block (rare: K is a multiple of 128 in real models)
        x2, w = F.pad(x2, (0, pad)), F.pad(w.view(torch.uint8), (0, pad)).view(w.dtype)
    xq, xs = quant_act.per_token_quant_fp8(x2, bk, group_major=True)
    y = quant_gemm.fp8_block_gemm(xq, xs, w, layer.weight_scale_inv, bk, bias, out_dtype=x.dtype,
                                  w_blocks=None if pad else layer.weight_blocks)
    return y.reshape(*shape[:-1], -1)
