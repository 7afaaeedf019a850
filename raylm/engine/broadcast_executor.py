"""Tensor parallelism with rank 0 in this process and no Ray task per rank per step.

Rank 0 is a `Worker` here (in the engine core's process); ranks 1.. are `Worker` Ray
actors in bundles 1.. of one STRICT_PACK placement group, bundle 0 being this process's
(the engine core actor's, when it runs in one; else one this executor makes and pins to
this node). Each step rank 0 broadcasts the msgpack-encoded plan on a CPU gloo group
beside the TP group (`parallel_state.broadcast_bytes`); ranks 1.. receive it in a loop
(`Worker.serve_plans`, one long-running actor call) and run it. Set-up calls before the
loop (load, memory profile, KV allocation) are Ray calls, sent to ranks 1.. before rank
0 runs its part, as the collectives need every rank.

If a rank dies, rank 0's next collective fails (its connection closes; a rank that hangs
instead is given up after MESSAGE_TIMEOUT_S on the message group, or the TP group's
timeout inside a step): the executor raises and stays failed.

Same interface as `UniProcExecutor` (raylm.engine.executor), plus `worker_info()`."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from typing import Optional

import torch

from raylm.engine.ray_executor import GRACEFUL_SHUTDOWN_S, PLACEMENT_TIMEOUT_S, validate_tensor_parallel
from raylm.workers import parallel_state
from raylm.workers.messages import StepPlan, StepResult
from raylm.workers.worker import Worker

logger = logging.getLogger("raylm")

# Rank 0 gives up on a broadcast after this long (a rank that stopped reading).
MESSAGE_TIMEOUT_S = 60.0
# Ranks 1.. wait this long for the next message: an idle server sends none.
IDLE_TIMEOUT_S = 10 * 365 * 86400.0
_RANK0_HERE = threading.Lock()  # held by the executor whose rank 0 is this process


def _bundle(num_cpus_per_worker: float, on_gpu: bool) -> dict:
    bundle = {"CPU": num_cpus_per_worker, "GPU": 1 if on_gpu else 0}
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}  # Ray refuses empty bundles


def rank_bundles(tensor_parallel_size: int, num_cpus_per_worker: float, on_gpu: bool) -> list[dict]:
    """The placement group's bundles, one per rank; bundle 0 is rank 0's process."""
    return [_bundle(num_cpus_per_worker, on_gpu) for _ in range(tensor_parallel_size)]


class BroadcastExecutor:
    """Rank 0 here, ranks 1.. in Ray actors fed by gloo broadcasts (see module doc)."""

    supports_async = True

    def __init__(self, model_dir: str, hf_config, dtype, device: str, block_size: int,
                 attention_backend: Optional[str], load_format: str, seed: int,
                 tensor_parallel_size: int = 2, num_cpus_per_worker: float = 0.5,
                 runner_options: Optional[dict] = None):
        validate_tensor_parallel(hf_config, tensor_parallel_size)
        self.world_size = tp = tensor_parallel_size
        self.group_id = f"raylm-tp{tp}-{uuid.uuid4().hex[:8]}"
        self.rank0: Optional[Worker] = None
        self.workers: list = []  # ranks 1.., Ray actors
        self._loops: Optional[list] = None  # their serve_plans calls, once started
        self._infos: list[dict] = []
        self._failed: Optional[str] = None
        self._lock = threading.Lock()  # one message and its local step at a time
        self.placement_group, self._own_placement_group = None, False
        self._threads_before = torch.get_num_threads()  # rank 0 sets its share; given back at shutdown
        # Rank 0's process group and parallel_state are this process's: one group per process.
        if not _RANK0_HERE.acquire(blocking=False):
            raise RuntimeError(
                "this process already holds a tensor-parallel group; distributed_executor_backend="
                "'ray_broadcast' keeps rank 0 in its process, so one group per process (use 'ray' "
                "for several groups in one process)")
        self._holds_process = True
        try:
            import ray

            if not ray.is_initialized():
                ray.init(address=os.environ.get("RAY_ADDRESS"))
            self._start(tp, num_cpus_per_worker, model_dir, hf_config, dtype, device, block_size,
                        attention_backend, load_format, seed, runner_options or {})
        except BaseException:
            self._failed = "start-up failed"  # no stop message: the loops never started
            self.shutdown()
            raise

    # ---- start-up ------------------------------------------------------------------
    def _placement(self, tp: int, num_cpus_per_worker: float, on_gpu: bool):
        """This process's placement group (the core actor's), or a new one with bundle 0
        pinned to this node."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        pg = get_current_placement_group()
        if pg is not None:
            if len(pg.bundle_specs) < tp:
                raise RuntimeError(f"this process's placement group has {len(pg.bundle_specs)} "
                                   f"bundle(s); tensor_parallel_size={tp} needs one per rank")
            self.placement_group = pg  # its creator removes it
            return pg
        bundles = rank_bundles(tp, num_cpus_per_worker, on_gpu)
        bundles[0][f"node:{ray.util.get_node_ip_address()}"] = 0.001  # rank 0 runs here
        pg = placement_group(bundles, strategy="STRICT_PACK", name=self.group_id)
        self.placement_group, self._own_placement_group = pg, True
        if not pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            raise RuntimeError(
                f"could not place {tp} rank(s) of {bundles[1]} on this node within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (tensor_parallel_size={tp}, num_cpus_per_worker="
                f"{num_cpus_per_worker}); the cluster has {ray.available_resources()} available")
        return pg

    def _rank0_device(self, device: str, pg) -> str:
        """On a GPU, rank 0 takes bundle 0's GPU: the only visible one in a core actor,
        else the one Ray reserved for bundle 0 (so no rank actor shares it)."""
        if not device.startswith("cuda") or not self._own_placement_group:
            return device
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        probe = ray.remote(num_gpus=1, num_cpus=0)(lambda: ray.get_gpu_ids()[0]).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
        gpu = str(ray.get(probe.remote()))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return f"cuda:{visible.split(',').index(gpu) if visible else int(gpu)}"

    def _start(self, tp, num_cpus_per_worker, model_dir, hf_config, dtype, device, block_size,
               attention_backend, load_format, seed, runner_options) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        on_gpu = device.startswith("cuda")
        pg = self._placement(tp, num_cpus_per_worker, on_gpu)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cpus or 1) // tp)  # the ranks share this node's cores
        init_method = f"tcp://127.0.0.1:{Worker.free_port()}"  # STRICT_PACK: all on this node
        common = (block_size, attention_backend, load_format, seed, threads, runner_options)
        remote_worker = ray.remote(Worker)
        bundle = rank_bundles(tp, num_cpus_per_worker, on_gpu)[0]
        for rank in range(1, tp):
            self.workers.append(remote_worker.options(
                name=f"{self.group_id}-rank{rank}", num_cpus=bundle.get("CPU", 0),
                num_gpus=1 if on_gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(rank, tp, init_method, model_dir, hf_config, dtype, device, *common,
                     message_timeout_s=IDLE_TIMEOUT_S))
        # Joining the group waits for every rank; then each loads its shard.
        self.rank0 = Worker(0, tp, init_method, model_dir, hf_config, dtype,
                            self._rank0_device(device, pg), *common, message_timeout_s=MESSAGE_TIMEOUT_S)
        self._infos = [self.rank0.info()] + self._get([w.info.remote() for w in self.workers])
        logger.info("raylm broadcast executor %s: rank 0 in this process, %d rank(s) in Ray "
                    "actors (%s each), %d torch thread(s) per rank", self.group_id, tp - 1,
                    bundle, threads)

    # ---- helpers -------------------------------------------------------------------
    def _get(self, refs: list) -> list:
        """Ranks 1..'s results; the first failure raises at once."""
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs)

    def _on_every_rank(self, method: str, *args):
        """Before the loops start: `method` on ranks 1.. (Ray calls, sent first) and on
        rank 0; rank 0's answer and the others'."""
        if self._loops is not None:
            raise RuntimeError(f"{method}() after the ranks started serving plans")
        self._check()
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        try:
            mine = getattr(self.rank0, method)(*args)
            return mine, self._get(refs)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _check(self) -> None:
        if self.rank0 is None:
            raise RuntimeError(f"broadcast executor {self.group_id} has been shut down")
        if self._failed is not None:
            raise RuntimeError(f"broadcast executor {self.group_id} failed earlier ({self._failed}); "
                               f"shut it down and start a new one")

    def _fail(self, exc: BaseException) -> RuntimeError:
        """Mark the group failed; an error that names the dead rank if Ray knows it."""
        import ray

        self._failed = f"{type(exc).__name__}: {exc}"
        dead = []
        if self._loops:
            done, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=1.0)
            for i, ref in enumerate(self._loops):
                if ref in done:
                    try:
                        ray.get(ref)
                    except Exception as err:
                        dead.append(f"rank {i + 1}: {type(err).__name__}")
        where = f" ({', '.join(dead)})" if dead else ""
        return RuntimeError(f"tensor-parallel group {self.group_id} lost a rank{where}: "
                            f"{type(exc).__name__}: {exc}")

    def _send(self, op: str, arg=None) -> None:
        self.rank0.broadcast_message(op, arg)

    # ---- the executor interface ----------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return self.rank0.kv_bytes_per_block()  # every rank holds the same share

    def available_kv_memory(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """The smallest of the ranks' KV budgets: every rank holds the same number of blocks."""
        mine, others = self._on_every_rank("available_kv_memory", gpu_memory_utilization,
                                           max_num_batched_tokens)
        return min([mine] + others)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate on every rank, then start ranks 1..'s plan loops."""
        self._on_every_rank("allocate_kv_cache", num_blocks)
        self._loops = [w.serve_plans.remote() for w in self.workers]

    def _step(self, plan: StepPlan, run):
        self._check()
        if self._loops is None:
            raise RuntimeError("allocate_kv_cache() before the first step")
        with self._lock:
            try:
                self._send("step", plan.to_wire())
                return run(plan)
            except BaseException as exc:
                raise self._fail(exc) from exc

    def execute(self, plan: StepPlan) -> StepResult:
        return self._step(plan, self.rank0.runner.execute)

    async def execute_async(self, plan: StepPlan) -> StepResult:
        return await asyncio.to_thread(self.execute, plan)

    def launch(self, plan: StepPlan):
        """Send the plan and queue rank 0's part; the ranks need no flush (every rank
        runs each plan as it arrives, and only rank 0 has results)."""
        return self._step(plan, self.rank0.runner.launch)

    def collect(self, pending) -> StepResult:
        try:
            return self.rank0.runner.collect(pending)
        except BaseException as exc:
            raise self._fail(exc) from exc

    async def collect_async(self, pending) -> StepResult:
        return await asyncio.to_thread(self.collect, pending)

    def profile_all_reduce(self, num_tokens: int, iters: int = 10) -> float:
        """Seconds per forward pass that rank 0 spends in all-reduces at `num_tokens` tokens
        (see ModelRunner.profile_all_reduce)."""
        if self._loops is None:
            return self._on_every_rank("profile_all_reduce", num_tokens, iters)[0]
        self._check()
        with self._lock:
            try:
                self._send("profile_all_reduce", [num_tokens, iters])
                return self.rank0.profile_all_reduce(num_tokens, iters)
            except BaseException as exc:
                raise self._fail(exc) from exc

    def worker_info(self) -> list[dict]:
        """Per-rank facts (rank, parameter_bytes, num_heads, num_kv_heads, head_dim, ...),
        as read at start-up."""
        return list(self._infos)

    def shutdown(self) -> None:
        """Stop the loops, kill the rank actors, leave the process group and remove the
        placement group if this executor made it (a core actor's goes with its creator)."""
        import ray

        workers, self.workers = getattr(self, "workers", []), []
        loops, self._loops = getattr(self, "_loops", None), None
        rank0, self.rank0 = getattr(self, "rank0", None), None
        pg, self.placement_group = getattr(self, "placement_group", None), None
        try:
            if rank0 is not None and loops and self._failed is None:
                try:
                    with self._lock:
                        rank0.broadcast_message("stop")
                    ray.wait(loops, num_returns=len(loops), timeout=GRACEFUL_SHUTDOWN_S)
                except Exception:  # a rank is gone: it is killed below all the same
                    pass
            if ray.is_initialized():
                for w in workers:
                    ray.kill(w, no_restart=True)
            if rank0 is not None:
                rank0.shutdown()
            if pg is not None and self._own_placement_group and ray.is_initialized():
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)
        finally:
            if getattr(self, "_holds_process", False):  # also when rank 0 failed half-way
                self._holds_process = False
                parallel_state.destroy_tensor_parallel()
                torch.set_num_threads(self._threads_before)
                _RANK0_HERE.release()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # interpreter shutdown: Ray may already be gone
            pass
