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
