"""Runs the model in Ray actors, one per tensor-parallel rank, packed onto one node by a
placement group. Each step plan is msgpack-encoded once and the same bytes go to every
rank (inline when small, one object-store put when large); only rank 0's result is
fetched.

Same interface as `UniProcExecutor` (raylm.engine.executor), plus `worker_info()`. For
asynchronous scheduling the ranks keep one step in flight: each `execute_pipelined` call
launches its plan and answers with the previous plan's result."""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Optional

import msgpack

from raylm.workers.messages import StepPlan, StepResult
from raylm.workers.worker import Worker

logger = logging.getLogger("raylm")

PLACEMENT_TIMEOUT_S = 60.0
GRACEFUL_SHUTDOWN_S = 5.0
# Plans up to this size are sent inline with each rank's task, larger ones via one
# ray.put (below Ray's 100 KiB inline limit, past which it would store a copy per task).
INLINE_PLAN_BYTES = 64 * 1024


def validate_tensor_parallel(hf_config, tensor_parallel_size: int) -> None:
    """Raise ValueError unless the model's heads and MLP split evenly over the ranks."""
    tp = tensor_parallel_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide num_attention_heads {heads}")
    if kv_heads >= tp and kv_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide num_key_value_heads {kv_heads}")
    if kv_heads < tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size {tp} must be a multiple of num_key_value_heads "
                         f"{kv_heads} (kv heads are replicated when there are fewer than ranks)")
    inter = hf_config.intermediate_size
    if inter % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide intermediate_size {inter}")


def _node_setup(world_size: int) -> tuple[int, int]:
    """Runs on the placement group's node: (a free port for rank 0's store, torch threads
    per rank so the ranks share the node's cores without oversubscribing them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Worker.free_port("127.0.0.1"), max(1, (cpus or 1) // world_size)


class _Launched:
    """A step sent with execute_pipelined; its result arrives with the next call's."""

    result_refs: Optional[list] = None


def _decode(wire: Optional[bytes]) -> StepResult:
    return StepResult() if wire is None else StepResult.from_wire(msgpack.unpackb(wire))


class RayExecutor:
    """`tensor_parallel_size` Ray actors running `raylm.workers.worker.Worker`."""

    def __init__(self, model_dir: str, hf_config, dtype, device: str, block_size: int,
                 attention_backend: Optional[str], load_format: str, seed: int,
                 tensor_parallel_size: int = 1, num_cpus_per_worker: float = 0.5,
                 runner_options: Optional[dict] = None):
        validate_tensor_parallel(hf_config, tensor_parallel_size)
        import ray
        from ray.util.placement_group import placement_group

        self.workers: list = []
        self._last_launched: Optional[_Launched] = None
        self.placement_group = None
        self.runner_options = runner_options or {}
        self._failed = False
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))
        self.world_size = tp = tensor_parallel_size
        self.group_id = f"raylm-tp{tp}-{uuid.uuid4().hex[:8]}"
        on_gpu = device.startswith("cuda")
        bundle = {"CPU": num_cpus_per_worker}
        if on_gpu:
            bundle["GPU"] = 1
        bundle = {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}  # Ray refuses empty bundles
        bundles = [dict(bundle) for _ in range(tp)]
        pg = placement_group(bundles, strategy="STRICT_PACK", name=self.group_id)
        self.placement_group = pg
        try:
            self._start_workers(pg, bundle, tp, num_cpus_per_worker, on_gpu, model_dir, hf_config,
                                dtype, device, block_size, attention_backend, load_format, seed)
        except BaseException:
            self._failed = True  # no graceful leave: a rank may be stuck joining the group
            self.shutdown()
            raise

    def _start_workers(self, pg, bundle, tp, num_cpus_per_worker, on_gpu, *worker_args) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            raise RuntimeError(
                f"could not place {tp} worker(s) of {bundle} on one node within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (tensor_parallel_size={tp}, num_cpus_per_worker="
                f"{num_cpus_per_worker}); the cluster has {ray.available_resources()} available")

        def strategy(i: int):
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

        setup = ray.remote(num_cpus=0)(_node_setup).options(scheduling_strategy=strategy(0))
        port, threads = ray.get(setup.remote(tp))
        init_method = f"tcp://127.0.0.1:{port}"  # STRICT_PACK: every rank is on this node
        remote_worker = ray.remote(Worker)
        for rank in range(tp):
            self.workers.append(remote_worker.options(
                name=f"{self.group_id}-rank{rank}", num_cpus=bundle.get("CPU", 0),
                num_gpus=1 if on_gpu else 0, scheduling_strategy=strategy(rank),
            ).remote(rank, tp, init_method, *worker_args, threads, self.runner_options))
        self._collect([w.info.remote() for w in self.workers])  # raises a rank's start-up error
        logger.info("raylm ray executor %s: %d rank(s), %s each, %d torch thread(s) per rank",
                    self.group_id, tp, bundle, threads)

    def _collect(self, refs: list) -> list:
        """Every rank's result. A failing rank raises at once, even while the others wait
        in a collective for it; the executor is then unusable (ranks may be out of step)."""
        import ray

        try:
            if len(refs) == 1:
                return [ray.get(refs[0])]
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return ray.get(refs)
        except BaseException:
            self._failed = True
            raise

    # ---- the executor interface ----------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return self._collect([w.kv_bytes_per_block.remote() for w in self.workers])[0]

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """The smallest of the ranks' KV budgets: every rank holds the same number of blocks."""
        return min(self._collect([w.available_kv_memory.remote(
            gpu_memory_utilization, max_num_batched_tokens) for w in self.workers]))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._collect([w.allocate_kv_cache.remote(num_blocks) for w in self.workers])

    def _submit(self, plan: StepPlan, method: str = "execute") -> list:
        import ray

        if not self.workers:
            raise RuntimeError(f"ray executor {self.group_id} has been shut down")
        if self._failed:
            raise RuntimeError(f"ray executor {self.group_id} failed in an earlier step; "
                               f"shut it down and start a new one")
        wire = msgpack.packb(plan.to_wire())
        # Encoded once; every rank gets the same bytes. A small plan travels inline in each
        # task (an object-store ref cost ~1.6 ms more per step on the 2-core box, see
        # benchmarks/ray_overhead.py); a large one goes to the object store once.
        arg = ray.put(wire) if len(self.workers) > 1 and len(wire) > INLINE_PLAN_BYTES else wire
        return [getattr(w, method).remote(arg) for w in self.workers]

    def execute(self, plan: StepPlan) -> StepResult:
        return _decode(self._collect(self._submit(plan))[0])

    async def execute_async(self, plan: StepPlan) -> StepResult:
        """`execute` without blocking the event loop, so several groups can step at once."""
        return _decode((await self._gather(self._submit(plan)))[0])

    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        """Seconds per forward pass that rank 0 spends in all-reduces at `num_tokens` tokens
        (see ModelRunner.profile_all_reduce)."""
        return self._collect([w.profile_all_reduce.remote(num_tokens, iters) for w in self.workers])[0]

    # ---- asynchronous scheduling: the ranks keep one step in flight ------------------
    # Each execute_pipelined call launches its plan and returns the previous plan's
    # result, so a step's result comes back with the next launch (or with a flush).
    supports_async = True

    def launch(self, plan: StepPlan) -> "_Launched":
        refs = self._submit(plan, "execute_pipelined")
        if self._last_launched is not None:
            self._last_launched.result_refs = refs
        self._last_launched = _Launched()
        return self._last_launched

    def _result_refs(self, launched: "_Launched") -> list:
        if launched.result_refs is None:  # nothing launched after it: ask for it
            if launched is not self._last_launched:
                raise RuntimeError("collect() of a step that is neither in flight nor answered")
            launched.result_refs = [w.flush.remote() for w in self.workers]
            self._last_launched = None
        return launched.result_refs

    def collect(self, launched: "_Launched") -> StepResult:
        return _decode(self._collect(self._result_refs(launched))[0])

    async def collect_async(self, launched: "_Launched") -> StepResult:
        return _decode((await self._gather(self._result_refs(launched)))[0])

    async def _gather(self, refs: list) -> list:
        """Every rank's result without blocking the event loop; a failing rank raises at once."""
        futs = [asyncio.wrap_future(ref.future()) for ref in refs]
        done, pending = await asyncio.wait(futs, return_when=asyncio.FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                self._failed = True
                for p in pending:
                    p.cancel()
                raise f.exception()
        return [f.result() for f in futs]

    def worker_info(self) -> list[dict]:
        """Per-rank facts (rank, parameter_bytes, num_heads, num_kv_heads, head_dim, ...)."""
        return self._collect([w.info.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Stop the actors and remove the placement group, freeing its reservation."""
        workers, self.workers = getattr(self, "workers", []), []
        pg, self.placement_group = getattr(self, "placement_group", None), None
        if not workers and pg is None:
            return
        import ray

        if not ray.is_initialized():
            return
        if workers and not getattr(self, "_failed", False):
            # Let ranks leave the process group cleanly; a rank stuck in a collective
            # is killed below all the same.
            ray.wait([w.shutdown.remote() for w in workers], num_returns=len(workers),
                     timeout=GRACEFUL_SHUTDOWN_S)
        for w in workers:
            ray.kill(w, no_restart=True)
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # interpreter shutdown: Ray may already be gone
            pass
