"""Executors run step plans on the workers. With tensor_parallel_size=1 the model runs
in this process (no Ray); TP > 1 (or distributed_executor_backend="ray") runs one Ray
actor per rank (`raylm.engine.ray_executor`).

Every executor offers: kv_bytes_per_block(), available_kv_memory(util, tokens),
allocate_kv_cache(n), execute(plan) -> StepResult, async execute_async(plan), shutdown()."""
from __future__ import annotations

import asyncio

from raylm.workers.messages import StepPlan, StepResult


class UniProcExecutor:
    """One ModelRunner in this process."""

    def __init__(self, model_dir: str, hf_config, dtype, device: str, block_size: int,
                 attention_backend: str, load_format: str, seed: int):
        from raylm.workers.model_runner import ModelRunner

        self.runner = ModelRunner(model_dir, hf_config, dtype, device, block_size,
                                  attention_backend=attention_backend, load_format=load_format,
                                  seed=seed)

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """Bytes the KV pool may take on a GPU: the utilisation share of the device minus
        what is already in use and an activation reserve for a full-budget step."""
        import torch

        free, total = torch.cuda.mem_get_info(self.runner.device)
        used = total - free
        cfg = self.runner.hf_config
        # Activations of one step: hidden states, qkv, the MLP's intermediate and the
        # logits rows, a few live at once (float32 logits for the sampled rows).
        elem = torch.empty((), dtype=self.runner.dtype).element_size()
        per_token = elem * (4 * cfg.hidden_size + 3 * cfg.intermediate_size)
        reserve = 2 * max_num_batched_tokens * per_token + 256 * cfg.vocab_size * 4 * 2
        return int(total * gpu_memory_utilization - used - reserve)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    async def execute_async(self, plan: StepPlan) -> StepResult:
        # torch releases the GIL inside its kernels, so the event loop keeps serving.
        return await asyncio.to_thread(self.runner.execute, plan)

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None


def make_executor(args, model_dir: str, hf_config, dtype, device: str):
    """The executor the engine arguments ask for."""
    backend = args.attention_backend or "torch"
    if args.tensor_parallel_size > 1 or args.distributed_executor_backend == "ray":
        from raylm.engine.ray_executor import RayExecutor

        return RayExecutor(model_dir, hf_config, dtype, device, args.block_size, backend,
                           args.load_format, args.seed, args.tensor_parallel_size,
                           args.num_cpus_per_worker)
    return UniProcExecutor(model_dir, hf_config, dtype, device, args.block_size, backend,
                           args.load_format, args.seed)
