"""What the quantization configs share: which layers stay dense, and the group layout of
scales and zero points under tensor parallelism."""
from __future__ import annotations

from typing import Optional

import torch


class QuantConfig:
    """One checkpoint's quantization: `get_linear_method(layer, prefix)` returns the
    method for a linear layer, or None to keep it dense."""

    name = "base"

    def __init__(self, modules_to_not_convert: Optional[list] = None):
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    def is_skipped(self, prefix: str) -> bool:
        """Layers a config leaves dense: `lm_head` (never built quantized here) and any whose
        checkpoint name contains an entry of modules_to_not_convert. A fused layer
        (qkv_proj, gate_up_proj) is skipped when any of its parts is."""
        names = [prefix]
        for fused, parts in ((".qkv_proj", (".q_proj", ".k_proj", ".v_proj")),
                             (".gate_up_proj", (".gate_proj", ".up_proj"))):
            if prefix.endswith(fused):
                names = [prefix[: -len(fused)] + p for p in parts]
        return any(m and m in n for m in self.modules_to_not_convert for n in names)

    def get_linear_method(self, layer, prefix: str):
        raise NotImplementedError


def check_int(cfg: dict, key: str, allowed, default=None):
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"quantization_config.{key} {value!r} is not supported; supported: {sorted(allowed)}")
    return value


def num_groups(input_size: int, group_size: int, what: str) -> int:
    if group_size == -1:
        return 1
    if input_size % group_size:
        raise ValueError(f"{what}: input size {input_size} (per tensor-parallel rank) is not a "
                         f"multiple of quantization_config.group_size {group_size}")
    return input_size // group_size


def scale_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """Scales keep float16 (their checkpoint dtype) unless the model computes in float32."""
    return torch.float32 if dtype in (None, torch.float32) else torch.float16


def use_w4r(layer, bits: int, group_size: int, has_g_idx: bool) -> bool:
    """Whether a 4-bit weight-only layer moves to quant_gemm's w4r layout (repack_w4): on
    the GPU, with bf16/fp16 activations (layer.act_dtype, set by create_weights), groups
    of whole 16-row K tiles, and no act-order gather left."""
    return (layer.qweight.is_cuda and bits == 4 and not has_g_idx
            and getattr(layer, "act_dtype", None) in (torch.bfloat16, torch.float16)
            and (group_size == -1 or group_size % 16 == 0))


def to_w4r(layer, q: torch.Tensor, z: Optional[torch.Tensor], group_size: int, zero_offset: int = 0) -> None:
    """Replace the layer's packed weight, scales and zero points by the w4r layout of the
    unpacked values q [K, N] and zero points z [groups, N] (None: symmetric). The packed
    weight keeps its int32 [K // 8, N] size; apply() then calls quant_gemm.w4r_gemm."""
    from torch import nn

    from raylm.kernels.quant import repack_w4

    qweight, scales, zb = repack_w4(q, z, layer.scales.data, layer.act_dtype, zero_offset)
    layer.qweight.data = qweight
    layer.scales = nn.Parameter(scales, requires_grad=False)
    layer.zb = nn.Parameter(zb, requires_grad=False)
    layer.qzeros = None
    layer.w4r_group_size = group_size


def apply_w4r(layer, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from raylm.kernels.quant import w4r_gemm

    shape = x.shape
    y = w4r_gemm(x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.zb, layer.w4r_group_size, bias=bias)
    return y.reshape(*shape[:-1], -1)
