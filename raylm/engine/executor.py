"""Executors run step plans on the workers. With tensor_parallel_size=1 the model runs
in this process (no Ray); TP > 1 (or distributed_executor_backend="ray") runs one Ray
actor per rank (`raylm.engine.ray_executor`); "ray_broadcast" at TP > 1 keeps rank 0 in
this process and feeds the other ranks' actors by gloo broadcast, no Ray task per step
(`raylm.engine.broadcast_executor`; at TP=1 it is the in-process executor).

Every executor offers: kv_bytes_per_block(), available_kv_memory(util, tokens),
allocate_kv_cache(n), execute(plan) -> StepResult, async execute_async(plan),
profile_all_reduce(tokens), shutdown(); and for asynchronous scheduling launch(plan) ->
handle, collect(handle) -> StepResult and async collect_async(handle)."""
from __future__ import annotations

import asyncio
from typing import Optional

from raylm.workers.messages import StepPlan, StepResult


class UniProcExecutor:
    """One ModelRunner in this process."""

    # launch(plan) -> pending and collect(pending) -> StepResult: asynchronous scheduling
    # plans the next step while the device runs this one.
    supports_async = True

    def __init__(self, model_dir: str, hf_config, dtype, device: str, block_size: int,
                 attention_backend: Optional[str], load_format: str, seed: int,
                 runner_options: Optional[dict] = None):
        from raylm.workers.model_runner import ModelRunner

        self.runner = ModelRunner(model_dir, hf_config, dtype, device, block_size,
                                  attention_backend=attention_backend, load_format=load_format,
                                  seed=seed, **(runner_options or {}))

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        return self.runner.available_kv_memory(gpu_memory_utilization, max_num_batched_tokens)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    # The engine may launch a step before it knows its grammar bitmasks (finish_sampling).
    supports_deferred_sampling = True

    # launch(before_inputs=...): a callback between the host's and the device's part of a launch.
    supports_before_inputs = True

    def launch(self, plan: StepPlan, defer_sampling: bool = False, before_inputs=None):
        return self.runner.launch(plan, defer_sampling, before_inputs)

    def finish_sampling(self, pending, bitmask_ids: list[str], bitmask) -> None:
        self.runner.finish_sampling(pending, bitmask_ids, bitmask)

    def collect(self, pending) -> StepResult:
        return self.runner.collect(pending)

    async def collect_async(self, pending) -> StepResult:
        return await asyncio.to_thread(self.runner.collect, pending)

    async def execute_async(self, plan: StepPlan) -> StepResult:
        # torch releases the GIL inside its kernels, so the event loop keeps serving.
        return await asyncio.to_thread(self.runner.execute, plan)

    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        return self.runner.profile_all_reduce(num_tokens, iters)

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None


def make_executor(args, model_dir: str, hf_config, dtype, device: str, max_model_len: int,
                  spec_decode: Optional[dict] = None):
    """The executor the engine arguments ask for. The attention backend defaults to the
    device's (Triton on CUDA, the PyTorch reference on CPU). `spec_decode`: the draft
    model or EAGLE-3 head each worker builds beside the target (a DraftSpec as a dict)."""
    backend = args.distributed_executor_backend
    if backend is not None and ":" in backend:  # "module:Class", e.g. the stand-in executor
        import importlib

        module, name = backend.split(":", 1)
        return getattr(importlib.import_module(module), name)(args, model_dir, hf_config, dtype, device,
                                                              max_model_len)
    options = {"enforce_eager": args.enforce_eager, "max_num_seqs": args.max_num_seqs,
               "max_model_len": max_model_len, "quantization": args.quantization,
               "kv_cache_dtype": args.kv_cache_dtype,
               "gpu_memory_share": min(1.0, args.num_gpus_per_worker)}
    if spec_decode is not None:
        options["spec_decode"] = spec_decode
    if backend == "ray_broadcast" and args.tensor_parallel_size > 1:
        from raylm.engine.broadcast_executor import BroadcastExecutor

        return BroadcastExecutor(model_dir, hf_config, dtype, device, args.block_size,
                                 args.attention_backend, args.load_format, args.seed,
                                 args.tensor_parallel_size, args.num_cpus_per_worker, options)
    if args.tensor_parallel_size > 1 or backend == "ray":
        from raylm.engine.ray_executor import RayExecutor

        return RayExecutor(model_dir, hf_config, dtype, device, args.block_size,
                           args.attention_backend, args.load_format, args.seed,
                           args.tensor_parallel_size, args.num_cpus_per_worker, options)
    return UniProcExecutor(model_dir, hf_config, dtype, device, args.block_size,
                           args.attention_backend, args.load_format, args.seed, options)
