"""AWQ checkpoints (version "gemm", and AutoRound's auto_awq layout): 4-bit weights packed
along the output dim in AWQ's interleaved order, per-group scales and zero points.

Stored per layer: qweight int32 [K, N / 8], qzeros int32 [K / group_size, N / 8],
scales [K / group_size, N]; w[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raylm.workers.layers.linear import set_dims
from raylm.workers.quantization.base import (QuantConfig, apply_w4r, check_int, num_groups, scale_dtype,
                                             to_w4r, use_w4r)


class AWQConfig(QuantConfig):
    name = "awq"

    def __init__(self, group_size: int, modules_to_not_convert=None, source: str = "awq"):
        super().__init__(modules_to_not_convert)
        self.bits, self.group_size, self.pack_factor, self.source = 4, group_size, 8, source

    @classmethod
    def from_config(cls, cfg: dict, source: str = "awq") -> "AWQConfig":
        check_int(cfg, "bits", {4}, cfg.get("w_bit", 4))
        group_size = cfg.get("group_size", cfg.get("q_group_size", 128))
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"quantization_config.group_size must be a positive integer for AWQ, got {group_size!r}")
        version = str(cfg.get("version", "gemm")).lower()
        if source == "awq" and version != "gemm":
            raise ValueError(f"quantization_config.version {version!r} is not supported; supported: 'gemm'")
        if cfg.get("zero_point", True) is False:
            raise ValueError("quantization_config.zero_point false is not supported for AWQ")
        return cls(group_size, cfg.get("modules_to_not_convert"), source)

    def get_linear_method(self, layer, prefix: str):
        return None if self.is_skipped(prefix) else AWQLinearMethod(self)


class AWQLinearMethod:
    def __init__(self, config: AWQConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        c = self.config
        if output_size % 8:
            raise ValueError(f"{layer.prefix}: output size {output_size} is not a multiple of 8 (AWQ packing)")
        groups = num_groups(input_size, c.group_size, layer.prefix)

        def param(t, out_dim, in_dim, packed=None):
            return set_dims(nn.Parameter(t, requires_grad=False), out_dim, in_dim, packed, 8)

        layer.qweight = param(torch.zeros(input_size, output_size // 8, dtype=torch.int32), 1, 0, 1)
        layer.qzeros = param(torch.zeros(groups, output_size // 8, dtype=torch.int32), 1, 0, 1)
        layer.scales = param(torch.zeros(groups, output_size, dtype=scale_dtype(dtype)), 1, 0)
        layer.act_dtype = dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if use_w4r(layer, 4, self.config.group_size, False):
            self.repack_w4r(layer)

    def repack_w4r(self, layer: nn.Module) -> None:
        """Move the layer to quant_gemm's w4r layout (base.to_w4r), as on the GPU."""
        from raylm.kernels.quant import unpack_awq

        q, z = unpack_awq(layer.qweight.data, layer.qzeros.data)
        to_w4r(layer, q, z, self.config.group_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        from raylm.kernels import quant as quant_gemm

        c = self.config
        if getattr(layer, "zb", None) is not None:
            return apply_w4r(layer, x, bias)
        if x.is_cuda:
            shape = x.shape
            y = quant_gemm.w4a16_gemm(x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.qzeros,
                                      None, c.group_size, "awq", bias=bias)
            return y.reshape(*shape[:-1], -1)
        w = quant_gemm.dequantize_awq(layer.qweight, layer.scales, layer.qzeros, c.group_size)
        y = torch.matmul(x, w.to(x.dtype))
        return y + bias if bias is not None else y
