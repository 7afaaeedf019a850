"""Quantized checkpoints: read `quantization_config` from config.json and give each linear
layer its linear method (packed weights and how to multiply by them).

Supported: GPTQ (`quant_method: "gptq"`), AWQ (`"awq"`, version "gemm"), AutoRound
(`"auto-round"`, whose `packing_format` `auto_round:auto_gptq` / `auto_round:auto_awq` are
the GPTQ and AWQ layouts), compressed-tensors (`"compressed-tensors"`: int8 W8A8, FP8,
pack-quantized W4A16), HF fp8 block checkpoints (`"fp8"`), and online `quantization="fp8"`
or `"int8"` of a dense checkpoint.
"""
from __future__ import annotations

from typing import Optional

from raylm.workers.quantization.awq import AWQConfig
from raylm.workers.quantization.gptq import GPTQConfig

_METHODS = {"gptq": GPTQConfig, "awq": AWQConfig}
# Online quantization of a dense checkpoint at load time (engine argument `quantization`).
ONLINE = ("fp8", "int8")


def _auto_round(cfg: dict):
    fmt = str(cfg.get("packing_format", "auto_round:auto_gptq"))
    layout = fmt.split(":")[-1]
    if layout in ("auto_gptq", "gptq"):
        return GPTQConfig.from_config(cfg, source=f"auto-round ({fmt})")
    if layout in ("auto_awq", "awq"):
        return AWQConfig.from_config(cfg, source=f"auto-round ({fmt})")
    raise ValueError(f"quantization_config.packing_format {fmt!r} is not supported; supported: "
                     f"'auto_round:auto_gptq', 'auto_round:auto_awq'")


def get_quant_config(hf_config, quantization: Optional[str] = None):
    """The checkpoint's quantization config (None for a dense checkpoint). `quantization`
    (the engine argument) must agree with the checkpoint when both are given."""
    cfg = getattr(hf_config, "quantization_config", None)
    if cfg is None:
        if quantization in ONLINE:
            from raylm.workers.quantization.online import OnlineQuantConfig

            return OnlineQuantConfig(quantization)
        if quantization is not None:
            raise ValueError(f"quantization={quantization!r} needs a checkpoint with a "
                             f"quantization_config; this one has none")
        return None
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    method = str(cfg.get("quant_method", "")).lower().replace("_", "-")
    if method in ("auto-round", "intel/auto-round"):
        qc = _auto_round(cfg)
    elif method == "compressed-tensors":
        from raylm.workers.quantization.compressed_tensors import CompressedTensorsConfig

        qc = CompressedTensorsConfig.from_config(cfg)
    elif method == "fp8":
        from raylm.workers.quantization.fp8 import FP8Config

        qc = FP8Config.from_config(cfg)
    elif method in _METHODS:
        qc = _METHODS[method].from_config(cfg)
    else:
        raise ValueError(f"quantization_config.quant_method {cfg.get('quant_method')!r} is not "
                         f"supported; supported: 'gptq', 'awq', 'auto-round'")
    if quantization is not None and quantization not in (method, qc.name):
        raise ValueError(f"quantization={quantization!r} does not match the checkpoint's "
                         f"quantization_config.quant_method {cfg.get('quant_method')!r}")
    return qc
