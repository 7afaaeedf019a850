"""compressed-tensors checkpoints (`quant_method: "compressed-tensors"`, as written by
llm-compressor and auto-round's llm_compressor export).

`quantization_config.config_groups` map `targets` (the class name "Linear", exact module
names, or "re:" regexes matched from the start of the name) to a scheme; modules named in
`ignore` stay dense. Supported schemes and their stored tensors per layer:

- `int-quantized` / `naive-quantized`, 8-bit int weights: weight int8 [N, K],
  weight_scale [N, 1] (strategy "channel") or one value ("tensor"); w = q * s.
- `float-quantized`, fp8 weights: weight float8_e4m3fn [N, K], weight_scale as above.
- `pack-quantized`, 4- or 8-bit int weights (W4A16/W8A16): weight_packed int32
  [N, K / (32 / bits)], weight_scale [N, K / group_size] ("group") or [N, 1] ("channel"),
  weight_shape [2], and for asymmetric schemes weight_zero_point int32
  [N / (32 / bits), groups]. compressed-tensors' pack_to_int32
  (compressors/quantized_compressors/pack_quantized.py) stores q + 2 ** (bits - 1) (unsigned)
  and puts value j of a word at bits j*bits..; weight_packed packs consecutive input
  columns (k = pack * i + j in word i), weight_zero_point consecutive output rows (its
  packed_dim=0, zero points offset the same way). So w = (q_stored - z_stored) * s, with
  z_stored = 2 ** (bits - 1) when symmetric. That is GPTQ's layout transposed: after loading
  the layer holds GPTQ's qweight [K / pack, N], scales [groups, N], qzeros [groups, N / pack]
  (zero_offset 0) and runs raylm's GPTQ dequantization / W4A16 kernel.

Input activations (8-bit schemes), as compressed-tensors' forward hooks compute them:
dynamic per token (strategy "token") or static per tensor (input_scale), symmetric.
- int8 uses compressed-tensors' own convention, not vLLM's amax / 127: scale = amax / 127.5
  (a zero scale becomes eps), q = round_half_even(clamp(x / scale, -128, 127))
  (raylm.kernels.quant_act "compressed-tensors"). The tools' reference log-probs come from
  compressed-tensors' decompression, which keeps these hooks, so this is the function the
  checkpoint was calibrated and evaluated with.
- fp8: scale = amax / 448, q = clamp(x / scale, -448, 448) cast to e4m3 (round to nearest
  even). quant_act's fp8 floors amax at 1e-10 where compressed-tensors uses eps only for an
  all-zero row; both give q = 0 for such a row, so the outputs agree.
- static: q = round(clamp(x / input_scale, qmin, qmax)) (fp8: the cast rounds).

Fused layers (qkv_proj, gate_up_proj) with per-tensor scales keep one weight scale per
projection and apply it to that projection's output rows (expanded to a per-channel
vector after loading): exact, no requantization to the max as vLLM does. Static input
scales are likewise kept per projection; projections whose scales differ quantize the
shared input separately (exact, as compressed-tensors runs them as separate Linears).

Tensor parallelism: weights, packed weights and per-channel scales split along N in
column layers and along K (weights, packed words, group scales, zero-point groups) in row
layers; per-tensor scales are replicated.

CPU path: dequantize the weight and quantize-dequantize the activations in float32,
then matmul in the model's dtype. CUDA: the Triton int8 GEMM / torch._scaled_mm W8A8 GEMMs
(raylm.kernels.quant_gemm) and the W4A16 Triton kernel; weight-only 8-bit schemes
dequantize on the fly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylm.workers.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, set_dims
from raylm.workers.quantization.base import QuantConfig, apply_w4r, num_groups, to_w4r, use_w4r

FORMATS = ("int-quantized", "naive-quantized", "float-quantized", "pack-quantized")
FP8_MAX = 448.0
_FUSED = ((".qkv_proj", (".q_proj", ".k_proj", ".v_proj")),
          (".gate_up_proj", (".gate_proj", ".up_proj")))


@dataclass(frozen=True)
class Scheme:
    """One config group's scheme, reduced to what raylm runs."""

    format: str
    weight_type: str          # "int" or "float" (fp8 e4m3)
    bits: int
    strategy: str             # "channel", "tensor" or "group"
    group_size: int           # -1 unless strategy "group"
    symmetric: bool
    act: Optional[str]        # None (weight-only), "dynamic" (per token) or "static" (per tensor)


def _parse_scheme(name: str, group: dict, default_format: Optional[str]) -> Scheme:
    where = f"quantization_config.config_groups.{name}"
    fmt = group.get("format") or default_format
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format {fmt!r} is not supported; supported: {list(FORMATS)}")
    w = group.get("weights")
    if not w:
        raise ValueError(f"{where}.weights is missing; activation-only schemes are not supported")
    if group.get("output_activations"):
        raise ValueError(f"{where}.output_activations is not supported")
    wtype, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if w.get("dynamic", False):
        raise ValueError(f"{where}.weights.dynamic true is not supported")
    if w.get("actorder") == "group":
        raise ValueError(f"{where}.weights.actorder 'group' (weight_g_idx) is not supported")
    sym = bool(w.get("symmetric", True))
    if fmt == "pack-quantized":
        ok = wtype == "int" and bits in (4, 8) and strategy in ("group", "channel")
        need = "int weights of 4 or 8 bits, strategy 'group' or 'channel'"
    elif fmt == "float-quantized":
        ok = wtype == "float" and bits == 8 and strategy in ("channel", "tensor") and sym
        need = "symmetric fp8 weights, strategy 'channel' or 'tensor'"
    else:
        ok = wtype == "int" and bits == 8 and strategy in ("channel", "tensor") and sym
        need = "symmetric int8 weights, strategy 'channel' or 'tensor'"
    if not ok:
        raise ValueError(f"{where}.weights (type {wtype!r}, num_bits {bits!r}, strategy "
                         f"{strategy!r}, symmetric {sym}) is not supported for format {fmt!r}; "
                         f"supported: {need}")
    group_size = -1
    if strategy == "group":
        group_size = w.get("group_size")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{where}.weights.group_size must be a positive integer, got {group_size!r}")
    a = group.get("input_activations")
    act = None
    if a:
        if fmt == "pack-quantized":
            raise ValueError(f"{where}.input_activations is not supported with format 'pack-quantized'")
        a_ok = (a.get("type", "int") == wtype and a.get("num_bits") == 8 and a.get("symmetric", True)
                and ((a.get("dynamic") is True and a.get("strategy") == "token")
                     or (a.get("dynamic") is False and a.get("strategy") == "tensor")))
        if not a_ok:
            raise ValueError(f"{where}.input_activations {a!r} is not supported; supported: "
                             f"symmetric 8-bit {wtype} activations, dynamic per 'token' or static "
                             f"per 'tensor'")
        act = "dynamic" if a["dynamic"] else "static"
    return Scheme(fmt, wtype, bits, strategy, group_size, sym, act)


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' target matching for a linear layer: its class name, a "re:"
    regex from the start of the module name, or the exact name."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], Scheme]], ignore: list[str]):
        super().__init__()
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, cfg: dict) -> "CompressedTensorsConfig":
        for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
            if cfg.get(key):
                raise ValueError(f"quantization_config.{key} is not supported (got {cfg[key]!r})")
        status = cfg.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise ValueError(f"quantization_config.quantization_status {status!r} is not supported; "
                             f"supported: 'compressed'")
        config_groups = cfg.get("config_groups") or {}
        if not config_groups:
            raise ValueError("quantization_config.config_groups is empty")
        groups = []
        for name, group in config_groups.items():
            targets = list(group.get("targets") or [])
            groups.append((targets, _parse_scheme(name, group, cfg.get("format"))))
        return cls(groups, list(cfg.get("ignore") or []))

    def _scheme_of(self, name: str) -> Optional[Scheme]:
        if any(_matches(name, t) for t in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(name, t) for t in targets):
                return scheme
        return None

    def get_linear_method(self, layer, prefix: str):
        names = [prefix]
        for fused, parts in _FUSED:
            if prefix.endswith(fused):
                names = [prefix[: -len(fused)] + p for p in parts]
        schemes = {self._scheme_of(n) for n in names}
        if len(schemes) > 1:
            raise ValueError(f"{prefix}: its parts {names} have different compressed-tensors "
                             f"schemes (or some are in `ignore`); a fused layer needs one")
        scheme = schemes.pop()
        if scheme is None:
            return None
        if scheme.format == "pack-quantized":
            return CompressedTensorsWNA16(scheme)
        return CompressedTensorsW8(scheme)


def _shards(layer) -> list[tuple[object, int]]:
    """(shard_id, output rows on this rank) of each checkpoint projection in the layer."""
    if isinstance(layer, QKVParallelLinear):
        q, kv = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
        return [("q", q), ("k", kv), ("v", kv)]
    if isinstance(layer, MergedColumnParallelLinear):
        return [(i, s // layer.tp_size) for i, s in enumerate(layer.output_sizes)]
    return [(None, layer.output_size_per_partition)]


def _param(t: torch.Tensor, out_dim, in_dim, packed_dim=None, pack_factor=1) -> nn.Parameter:
    return set_dims(nn.Parameter(t, requires_grad=False), out_dim, in_dim, packed_dim, pack_factor)


def _per_shard_param(layer, what: str) -> nn.Parameter:
    """One float32 value per fused projection (per-tensor scales), loaded by shard_id."""
    ids = [s for s, _ in _shards(layer)]
    p = _param(torch.ones(len(ids), dtype=torch.float32), None, None)

    def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.numel() != 1:
            raise ValueError(f"{layer.prefix}.{what}: expected one value (per-tensor), got "
                             f"shape {tuple(loaded_weight.shape)}")
        param.data[ids.index(shard_id)] = loaded_weight.reshape(()).float()

    p.weight_loader = load
    return p


def _expand(layer, per_shard: torch.Tensor) -> torch.Tensor:
    """Per-projection values -> one per output row of this rank [N_local]."""
    sizes = torch.tensor([n for _, n in _shards(layer)], device=per_shard.device)
    return per_shard.repeat_interleave(sizes)


class CompressedTensorsW8:
    """8-bit int (int-quantized) or fp8 (float-quantized) weights, per-channel or per-tensor
    scales, with optional 8-bit input activation quantization (W8A8) of the same type."""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme
        self.wdtype = torch.int8 if scheme.weight_type == "int" else torch.float8_e4m3fn

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        s = self.scheme
        layer.weight = _param(torch.zeros(output_size, input_size, dtype=self.wdtype), 0, 1)
        if s.strategy == "channel":
            layer.weight_scale = _param(torch.ones(output_size, 1, dtype=torch.float32), 0, None)
        else:
            layer.weight_scale = _per_shard_param(layer, "weight_scale")
        if s.act == "static":
            layer.input_scale = _per_shard_param(layer, "input_scale")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.scheme.strategy == "channel":
            layer.channel_scale = layer.weight_scale.data.reshape(-1)
        else:
            layer.channel_scale = _expand(layer, layer.weight_scale.data)
        # Output-row ranges that share one static input scale (usually the whole layer).
        layer.act_slices = [(0, layer.output_size_per_partition, None)]
        if self.scheme.act == "static":
            scales = layer.input_scale.data.tolist()
            sizes = [n for _, n in _shards(layer)]
            if len(set(scales)) == 1:
                layer.act_slices = [(0, sum(sizes), scales[0])]
            else:
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                layer.act_slices = list(zip(starts, sizes, scales))

    def _quant_dequant(self, x: torch.Tensor, static_scale: Optional[float]) -> torch.Tensor:
        """CPU reference: x through the scheme's activation quantization and back, float32."""
        from raylm.kernels.quant import act as quant_act

        xf = x.float()
        if self.scheme.act is None:
            return xf
        if static_scale is not None:
            v = xf / static_scale
            if self.scheme.weight_type == "int":
                return torch.round(v.clamp(-128, 127)) * static_scale
            return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * static_scale
        if self.scheme.weight_type == "int":
            q, scale = quant_act.per_token_quant_int8_ref(xf, "compressed-tensors")
        else:
            q, scale = quant_act.per_token_quant_fp8_ref(xf)
        return q.float() * scale

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        parts = []
        for start, size, static in layer.act_slices:
            w, ws = layer.weight[start:start + size], layer.channel_scale[start:start + size]
            if x.is_cuda and self.scheme.act is not None:
                parts.append(self._apply_cuda(x2, w, ws, static))
            else:  # CPU, and weight-only schemes: dequantize, then one matmul
                xd = self._quant_dequant(x2, static).to(x.dtype)
                parts.append(F.linear(xd, (w.float() * ws.reshape(-1, 1)).to(x.dtype)))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], -1)

    def _apply_cuda(self, x2, w, ws, static: Optional[float]) -> torch.Tensor:
        from raylm.kernels import quant as quant_gemm
        from raylm.kernels.quant import act as quant_act

        if self.scheme.weight_type == "int":
            if static is None:
                xq, xs = quant_act.per_token_quant_int8(x2, "compressed-tensors")
            else:
                xq = torch.round((x2.float() / static).clamp(-128, 127)).to(torch.int8)
                xs = torch.full((x2.shape[0], 1), static, device=x2.device)
            return quant_gemm.w8a8_int8_gemm(xq, xs, w, ws, out_dtype=x2.dtype)
        if static is None:
            xq, xs = quant_act.per_token_quant_fp8(x2)
        else:
            xq = (x2.float() / static).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            xs = torch.full((x2.shape[0], 1), static, device=x2.device)
        return quant_gemm.fp8_gemm(xq, xs, w, ws, out_dtype=x2.dtype)


class CompressedTensorsWNA16:
    """pack-quantized 4/8-bit int weights, group or channel scales, optional zero points;
    activations stay in the model's dtype. Held in GPTQ's layout after loading."""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme
        self.pack = 32 // scheme.bits

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: Optional[torch.dtype]) -> None:
        s, pack = self.scheme, self.pack
        layer.act_dtype = dtype
        if input_size % pack:
            raise ValueError(f"{layer.prefix}: input size {input_size} (per tensor-parallel rank) "
                             f"is not a multiple of {pack} ({s.bits}-bit values per int32)")
        if s.strategy == "group":
            groups, group_dim = num_groups(input_size, s.group_size, layer.prefix), 1
        else:
            groups, group_dim = 1, None
        layer.weight_packed = _param(torch.zeros(output_size, input_size // pack, dtype=torch.int32),
                                     0, 1, 1, pack)
        layer.weight_scale = _param(torch.ones(output_size, groups, dtype=torch.float32), 0, group_dim)
        if not s.symmetric:
            if any(n % pack for _, n in _shards(layer)):
                raise ValueError(f"{layer.prefix}: output rows per projection {_shards(layer)} are "
                                 f"not multiples of {pack}, as packed zero points need")
            layer.weight_zero_point = _param(torch.zeros(output_size // pack, groups, dtype=torch.int32),
                                             0, group_dim, 0, pack)
        # The unpadded [N, K] of each projection: checked, not stored.
        layer.weight_shape = _param(torch.zeros(2, dtype=torch.int64), None, None)
        layer.weight_shape.weight_loader = self._shape_loader(layer)
        layer.weight_shape.optional = True

    @staticmethod
    def _shape_loader(layer):
        def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            if int(loaded_weight[1]) != layer.input_size:
                raise ValueError(f"{layer.prefix}.weight_shape {loaded_weight.tolist()}: input size "
                                 f"should be {layer.input_size}")
            param.data.copy_(loaded_weight)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # compressed-tensors' layout is GPTQ's transposed (see the module docstring).
        def swap(old: str, new: str) -> None:
            t = getattr(layer, old).data.t().contiguous()
            delattr(layer, old)
            setattr(layer, new, nn.Parameter(t, requires_grad=False))

        swap("weight_packed", "qweight")
        swap("weight_scale", "scales")
        if not self.scheme.symmetric:
            swap("weight_zero_point", "qzeros")
        else:
            layer.qzeros = None
        delattr(layer, "weight_shape")
        if use_w4r(layer, self.scheme.bits, self.scheme.group_size, False):
            self.repack_w4r(layer)

    def repack_w4r(self, layer: nn.Module) -> None:
        """Move the layer to quant_gemm's w4r layout (base.to_w4r), as on the GPU."""
        from raylm.kernels.quant import unpack_gptq

        q, z = unpack_gptq(layer.qweight.data, None if layer.qzeros is None else layer.qzeros.data, 4)
        to_w4r(layer, q, z, self.scheme.group_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        from raylm.kernels import quant as quant_gemm

        s = self.scheme
        if getattr(layer, "zb", None) is not None:
            return apply_w4r(layer, x, bias)
        if x.is_cuda:
            shape = x.shape
            y = quant_gemm.w4a16_gemm(x.reshape(-1, shape[-1]), layer.qweight, layer.scales,
                                      layer.qzeros, None, s.group_size, "gptq", bits=s.bits, bias=bias)
            return y.reshape(*shape[:-1], -1)
        w = quant_gemm.dequantize_gptq(layer.qweight, layer.scales, layer.qzeros, None,
                                       s.group_size, bits=s.bits)
        y = torch.matmul(x, w.to(x.dtype))
        return y + bias if bias is not None else y
