"""Finding a model and streaming its weights: a local HF directory (single or sharded
safetensors), a GGUF file (converted once and cached), or a hub id when the hub is
reachable."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch


def resolve_model_path(model: str | None) -> str:
    """A local directory holding config.json for `model` (None = the embedded default)."""
    from raylm.workers import gguf_loader

    if model is None:
        model = gguf_loader.default_model_path()
    if os.path.isfile(model) and model.endswith(".gguf"):
        return gguf_loader.convert_gguf(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"model directory {model!r} has no config.json")
        return model
    if os.path.exists(model):
        raise ValueError(f"model {model!r} is neither a model directory nor a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _download(model)
    raise ValueError(f"model path {model!r} does not exist")


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # the hub is unreachable or the repo does not exist
        raise ValueError(f"model {repo_id!r} is not a local path and could not be fetched from "
                         f"the Hugging Face hub ({type(exc).__name__}: {exc}); "
                         f"pass a local model directory or .gguf file") from exc


def load_config(model_dir: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except ValueError as exc:
        raise ValueError(f"cannot read config.json of {model_dir!r}: {exc}") from exc


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model directory {model_dir!r} has no .safetensors weights")
    return [os.path.join(model_dir, f) for f in files]


def iterate_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one file at a time."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def dummy_checkpoint(hf_config, dtype: torch.dtype, device, seed: int = 0
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """`load_format="dummy"` for a dense model: the full, unsharded tensors a checkpoint of
    `hf_config` would hold (HF names and shapes, read off a meta-device transformers
    model), drawn on `device` one at a time. Each tensor's values depend only on `seed`
    and its name, so every tensor-parallel rank slices the same model out of them and
    TP=N computes what TP=1 does. Norm weights are 1, the rest uniform in +-0.02."""
    import zlib

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config)
    shapes = [(name, tuple(p.shape)) for name, p in meta.named_parameters()]  # tied ones once
    del meta
    for name, shape in shapes:
        if "norm" in name:
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        yield name, torch.empty(shape, dtype=dtype, device=device).uniform_(-0.02, 0.02, generator=gen)


def random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """`load_format="dummy"` for a checkpoint-quantized model (dense models use
    `dummy_checkpoint`): fill this rank's parameters with small random values, generated
    on their device (an 8B model is not drawn on the CPU). Packed quantized tensors get random bits,
    their scales small positive values; g_idx keeps its in-order default."""
    gens: dict = {}
    for name, param in model.named_parameters():
        dev = param.device
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        gen = gens[dev]
        if "norm" in name:
            param.data.fill_(1.0)
        elif name.endswith("g_idx"):
            continue
        elif not param.dtype.is_floating_point:
            param.data.copy_(torch.randint(-2**31, 2**31 - 1, param.shape, generator=gen,
                                           device=dev, dtype=torch.int64).to(param.dtype))
        else:
            lo, hi = (0.001, 0.01) if "scale" in name else (-0.02, 0.02)
            if param.element_size() == 1:  # float8: no random kernels; draw in float32
                param.data.copy_(torch.empty(param.shape, device=dev).uniform_(lo, hi, generator=gen))
            else:
                param.data.uniform_(lo, hi, generator=gen)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading") and module is not model:
            module.process_weights_after_loading()
