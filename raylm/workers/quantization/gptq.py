"""GPTQ checkpoints (and AutoRound's auto_gptq layout): 4- or 8-bit weights packed along
the input dim, per-group scales and zero points, optional act-order `g_idx`.

Stored per layer: qweight int32 [K / (32/bits), N], qzeros int32 [groups, N / (32/bits)],
scales [groups, N], g_idx int32 [K] (the group of each input row). The weight is
w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]; checkpoint_format "gptq" (v1)
stores z - 1.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raylm.workers.layers.linear import set_dims
from raylm.workers.quantization.base import (QuantConfig, apply_w4r, check_int, num_groups, scale_dtype,
                                             to_w4r, use_w4r)


class GPTQConfig(QuantConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool, zero_offset: int,
                 modules_to_not_convert=None, source: str = "gptq"):
        super().__init__(modules_to_not_convert)
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.zero_offset = zero_offset
        self.pack_factor = 32 // bits
        self.source = source

    @classmethod
    def from_config(cls, cfg: dict, source: str = "gptq") -> "GPTQConfig":
        bits = check_int(cfg, "bits", {4, 8})
        group_size = cfg.get("group_size", 128)
        if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
            raise ValueError(f"quantization_config.group_size must be -1 or a positive integer, got {group_size!r}")
        fmt = cfg.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported; "
                             f"supported: 'gptq', 'gptq_v2'")
        if cfg.get("lm_head", False):
            raise ValueError("quantization_config.lm_head true (a quantized LM head) is not supported")
        skip = list(cfg.get("modules_to_not_convert") or [])
        return cls(bits, group_size, bool(cfg.get("desc_act", False)), bool(cfg.get("sym", True)),
                   1 if fmt == "gptq" else 0, skip, source)

    def get_linear_method(self, layer, prefix: str):
        return None if self.is_skipped(prefix) else GPTQLinearMethod(self)


class GPTQLinearMethod:
    def __init__(self, config: GPTQConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        c = self.config
        pack = c.pack_factor
        for what, size in (("input size", input_size), ("output size", output_size)):
            if size % pack:
                raise ValueError(f"{layer.prefix}: {what} {size} is not a multiple of {pack} "
                                 f"({c.bits}-bit values per int32)")
        sharded_input = input_size != layer.input_size
        if c.group_size == -1:
            groups, group_dim = 1, None
        elif c.desc_act and sharded_input:
            # Act-order rows of a shard belong to any group: keep every group's scales.
            groups, group_dim = num_groups(layer.input_size, c.group_size, layer.prefix), None
        else:
            groups, group_dim = num_groups(input_size, c.group_size, layer.prefix), 0

        def param(t, out_dim, in_dim, packed=None):
            return set_dims(nn.Parameter(t, requires_grad=False), out_dim, in_dim, packed, pack)

        layer.qweight = param(torch.zeros(input_size // pack, output_size, dtype=torch.int32), 1, 0, 0)
        layer.qzeros = param(torch.zeros(groups, output_size // pack, dtype=torch.int32), 1, group_dim, 1)
        layer.scales = param(torch.zeros(groups, output_size, dtype=scale_dtype(dtype)), 1, group_dim)
        # Without act order the checkpoint may omit g_idx: rows follow groups in order.
        # Indices are global (the shard's rows sit at rank * input_size..); see below.
        start = layer.tp_rank * input_size if sharded_input else 0
        rows = torch.arange(start, start + input_size, dtype=torch.int32)
        default = rows // c.group_size if c.group_size != -1 else torch.zeros_like(rows)
        layer.g_idx = param(default, None, 0)
        layer.g_idx.optional = True
        layer.act_perm, layer.kernel_g_idx = None, layer.g_idx  # see _order_groups
        layer.group_dim = group_dim
        layer.num_groups = groups
        layer.act_dtype = dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.group_dim == 0 and layer.input_size_per_partition != layer.input_size:
            # This rank holds only its own groups' scales: make g_idx local to them.
            layer.g_idx.data -= layer.tp_rank * layer.num_groups
        if int(layer.g_idx.min()) < 0 or int(layer.g_idx.max()) >= layer.num_groups:
            raise ValueError(f"{layer.prefix}.g_idx points outside its {layer.num_groups} groups")
        self._order_groups(layer)
        c = self.config
        if use_w4r(layer, c.bits, c.group_size, layer.kernel_g_idx is not None):
            self.repack_w4r(layer)

    def repack_w4r(self, layer: nn.Module) -> None:
        """Move the layer to quant_gemm's w4r layout (base.to_w4r); process_weights_after_loading
        does so on the GPU where use_w4r allows."""
        from raylm.kernels.quant import unpack_gptq

        c = self.config
        q, z = unpack_gptq(layer.qweight.data, layer.qzeros.data, c.bits)
        to_w4r(layer, q, z, c.group_size, c.zero_offset)

    def _order_groups(self, layer: nn.Module) -> None:
        """Give the kernel contiguous groups where the function allows it.

        A g_idx that is just row // group_size (no act order; the default when the
        checkpoint has none) is dropped: the kernel then reads one row of scales per K tile
        instead of gathering a scale per element. On the H100 (2026-11-27) the gathering path
        was 11x slower for a Llama-3.1-8B layer at M=1. An act-order g_idx whose groups are
        complete (every group has group_size rows, as GPTQ makes them) is sorted away: the
        packed rows are permuted once so that each group is contiguous, and each call
        permutes the input's columns the same way (y = x[:, perm] @ W[perm]). Otherwise (a
        row-parallel shard of an act-order layer holds parts of many groups) g_idx stays."""
        c = self.config
        g = layer.g_idx.data.long()
        k = g.numel()
        gs = k if c.group_size == -1 else c.group_size
        trivial = torch.arange(k, device=g.device) // gs
        layer.act_perm, layer.kernel_g_idx = None, layer.g_idx
        if torch.equal(g, trivial):
            layer.kernel_g_idx = None
            return
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], trivial):
            return
        from raylm.kernels.quant import unpack_rows, pack_rows

        q = unpack_rows(layer.qweight.data, c.bits)
        layer.qweight.data = pack_rows(q[perm], c.bits)
        layer.act_perm, layer.kernel_g_idx = perm, None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        from raylm.kernels import quant as quant_gemm

        c = self.config
        if layer.act_perm is not None:  # rows were sorted by group (see _order_groups)
            x = x.index_select(-1, layer.act_perm)
        if getattr(layer, "zb", None) is not None:
            return apply_w4r(layer, x, bias)
        if x.is_cuda:
            shape = x.shape
            y = quant_gemm.w4a16_gemm(x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.qzeros,
                                      layer.kernel_g_idx, c.group_size, "gptq", bits=c.bits,
                                      zero_offset=c.zero_offset, bias=bias)
            return y.reshape(*shape[:-1], -1)
        # CPU: dequantize in float32 (exact: small ints times the fp16 scales), then matmul
        # in the model's dtype.
        w = quant_gemm.dequantize_gptq(layer.qweight, layer.scales, layer.qzeros, layer.kernel_g_idx,
                                       c.group_size, bits=c.bits, zero_offset=c.zero_offset)
        y = torch.matmul(x, w.to(x.dtype))
        return y + bias if bias is not None else y
