"""Engine arguments (vLLM's names) and the configuration derived from them."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Union

_DTYPES = {"float32": "float32", "float": "float32", "fp32": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "half": "float16", "fp16": "float16"}

CPU_KV_CACHE_CAP_BYTES = 1 << 30
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass
class EngineArgs:
    """Every knob of the engine, spelled as in vLLM. `model=None` means the embedded
    default (SmolLM2-135M-Instruct)."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    # None: whatever the checkpoint's quantization_config says (gptq, awq, auto-round).
    quantization: Optional[str] = None
    max_model_len: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: int = 256
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    device: str = "auto"
    attention_backend: Optional[str] = None
    load_format: str = "auto"
    enforce_eager: bool = False
    # vLLM's name. Plan step N+1 while the device runs step N (outputs come one step
    # later; a request may compute one token past its stop, which is dropped). None: on
    # for a GPU with the in-process executor (TP=1), off otherwise.
    async_scheduling: Optional[bool] = None
    # "auto": the model's dtype; "fp8"/"fp8_e4m3": float8_e4m3fn with per-layer scales of 1.0
    # (vLLM's default without calibrated scales), half the bytes of a bf16 cache.
    kv_cache_dtype: str = "auto"
    max_logprobs: int = 20
    tensor_parallel_size: int = 1
    long_prefill_token_threshold: int = 0
    # "ray": run the model in Ray actors even at tensor_parallel_size=1, one Ray task per
    # rank per step; "ray_broadcast": rank 0 in this process, ranks 1.. in Ray actors fed
    # by a gloo broadcast of each step (one group per process); "uni": in-process; None:
    # in-process at TP=1, "ray" above; "module:Class": that executor (the stand-in).
    distributed_executor_backend: Optional[str] = None
    # CPUs each Ray worker actor reserves; fractional so a 2-core box fits TP=2 plus Serve.
    num_cpus_per_worker: float = 0.5
    # GPUs each worker actor reserves: a fraction lets several worker groups share one GPU
    # (at tensor_parallel_size=1), each sizing its KV cache from its share of
    # gpu_memory_utilization.
    num_gpus_per_worker: float = 1.0
    # vLLM's name: a dict or JSON string, parsed into `spec_decode.SpeculativeConfig`
    # (method ngram / draft_model / eagle3, num_speculative_tokens, ...). None: off.
    speculative_config: Optional[Union[dict, str]] = None
    # vLLM's name: a dict or JSON string, e.g. {"backend": "xgrammar"}; backends "xgrammar"
    # (the default) and "auto" (= xgrammar). Checked here, used by the engine core.
    structured_outputs_config: Optional[Union[dict, str]] = None
    # vLLM's name: where requests' sampling defaults come from. "auto": the model's
    # generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,
    # max_new_tokens); "vllm": none (SamplingParams' own); a folder: its generation_config.json.
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        def check(name, ok, limit):
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")

        check("block_size", isinstance(self.block_size, int) and self.block_size >= 1, ">= 1")
        check("max_num_seqs", isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, ">= 1")
        check("max_model_len", self.max_model_len is None or self.max_model_len >= 1, ">= 1")
        check("max_num_batched_tokens",
              self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1, ">= 1")
        check("kv_cache_memory_bytes",
              self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "> 0")
        check("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "in (0, 1]")
        check("dtype", self.dtype == "auto" or self.dtype in _DTYPES,
              f"'auto' or one of {sorted(_DTYPES)}")
        check("load_format", self.load_format in ("auto", "safetensors", "gguf", "dummy"),
              "one of 'auto', 'safetensors', 'gguf', 'dummy'")
        check("tensor_parallel_size",
              isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1, ">= 1")
        check("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES, f"one of {KV_CACHE_DTYPES}")
        check("max_logprobs", self.max_logprobs >= 0, ">= 0")
        check("distributed_executor_backend",
              self.distributed_executor_backend in (None, "ray", "ray_broadcast", "uni")
              or ":" in str(self.distributed_executor_backend),
              "None, 'ray', 'ray_broadcast', 'uni' or an executor class as 'module:Class'")
        check("num_cpus_per_worker", self.num_cpus_per_worker >= 0, ">= 0")
        check("num_gpus_per_worker", 0 < self.num_gpus_per_worker <= 1
              or (self.num_gpus_per_worker > 1 and float(self.num_gpus_per_worker).is_integer()),
              "in (0, 1] or a whole number")
        if self.num_gpus_per_worker < 1 and self.tensor_parallel_size > 1:
            raise ValueError(f"num_gpus_per_worker {self.num_gpus_per_worker} < 1 needs "
                             f"tensor_parallel_size 1 (ranks of one group cannot share a GPU), "
                             f"got tensor_parallel_size {self.tensor_parallel_size}")
        check("generation_config", self.generation_config in ("auto", "vllm")
              or (isinstance(self.generation_config, str) and os.path.isdir(self.generation_config)),
              "'auto', 'vllm' or a folder holding generation_config.json")
        from raylm.engine.structured_outputs import parse_structured_outputs_config

        parse_structured_outputs_config(self.structured_outputs_config)  # raises naming the backend
        self.parsed_speculative_config()  # raises on a bad key or value

    def parsed_speculative_config(self):
        """`speculative_config` as a validated `SpeculativeConfig` (None: off)."""
        from raylm.engine.spec_decode.config import parse_speculative_config

        return parse_speculative_config(self.speculative_config, self.tensor_parallel_size)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, hf_config, device: str):
    """`auto`: the checkpoint's dtype on GPU (float32 checkpoints run in bfloat16),
    float32 on CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, _DTYPES[dtype])
    if device == "cpu":
        return torch.float32
    cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    if cfg in (torch.float16, torch.bfloat16):
        return cfg
    return torch.bfloat16


def resolve_max_model_len(args: EngineArgs, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, int(window))  # no sliding-window attention: stay inside it
    if args.max_model_len is None:
        return int(limit)
    if args.max_model_len > limit:
        raise ValueError(f"max_model_len {args.max_model_len} exceeds the model's limit of {limit} "
                         f"positions (max_position_embeddings/sliding_window)")
    return args.max_model_len
