"""The global scheduler: one place that owns every request across all worker groups.

Each group is one `LLMEngine` (its own block manager, continuous-batching scheduler and
executor: Ray actors for the TP ranks, or the in-process runner). A new request goes to
the group that already caches the longest part of its prefix, unless that group is
clearly busier; otherwise to the least-loaded group. Each group runs its own step loop
on the asyncio event loop; outputs stream back to each request's queue.

Overlap: after a step's tokens are recorded, the next step is sent to the workers before
the previous one is detokenized and streamed, so the model computes while the host does
that work.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from raylm.cluster.backend import final_output
from raylm.cluster.metrics import EngineMetrics
from raylm.cluster.multiplex import next_item
from raylm.engine.config import EngineArgs
from raylm.engine.llm_engine import LLMEngine, PromptType
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.scheduler.block_manager import prefix_block_hashes

logger = logging.getLogger("raylm")

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
# Prefer the group caching a request's prefix unless its load exceeds the least-loaded
# group's by more than this (load = queued requests / max_num_seqs + KV usage).
AFFINITY_LOAD_SLACK = 0.5


@dataclass(eq=False)
class _Stream:
    """One request's outputs go to its queue (generate_stream) or to sink(request_id,
    output or exception) (submit)."""
    group: int
    queue: Optional[asyncio.Queue]
    arrival: float
    hashes: list[int]
    sink: Optional[Callable] = None
    last_time: Optional[float] = None
    finished: bool = False


@dataclass(eq=False)
class _GroupState:
    engine: LLMEngine
    wake: Optional[asyncio.Event] = None
    task: Optional[asyncio.Task] = None
    error: Optional[BaseException] = None
    # Block hashes of the requests assigned here and not finished: a burst of requests
    # sharing a prefix follows the first one before its KV is cached.
    inflight_hashes: Counter = field(default_factory=Counter)
    steps: int = 0
    busy_s: float = 0.0  # time with a step on the workers, up to busy_since
    busy_since: Optional[float] = None  # a step has been on the workers since then
    requests: int = 0  # routed here

    def mark_busy(self) -> None:
        """A step goes to the workers (a no-op while one already is)."""
        if self.busy_since is None:
            self.busy_since = time.perf_counter()

    def mark_idle(self) -> None:
        """No step is on the workers any more: add the span to busy_s."""
        if self.busy_since is not None:
            self.busy_s += time.perf_counter() - self.busy_since
            self.busy_since = None

    def busy_seconds(self) -> float:
        return self.busy_s + (time.perf_counter() - self.busy_since if self.busy_since is not None else 0.0)


def _build_engines(args: EngineArgs, num_groups: int) -> list[LLMEngine]:
    """One engine per group. Groups on Ray actors (tensor_parallel_size > 1 or
    distributed_executor_backend="ray") start at once, each in a thread, since each
    mostly waits for its own actors to load and warm up (2 groups of Llama-3.1-8B on an
    H200 host took 63-72 s one after the other, against 35 s for one). In-process
    groups are built one by one: they share this process's RNG and CPU. If any fails,
    the others are shut down and the first error is raised."""
    on_ray = args.tensor_parallel_size > 1 or args.distributed_executor_backend == "ray"
    engines, errors = [], []
    if on_ray and num_groups > 1:
        with ThreadPoolExecutor(num_groups, thread_name_prefix="raylm-group") as pool:
            for future in [pool.submit(LLMEngine, args) for _ in range(num_groups)]:
                try:
                    engines.append(future.result())
                except BaseException as exc:
                    errors.append(exc)
    else:
        for _ in range(num_groups):
            try:
                engines.append(LLMEngine(args))
            except BaseException as exc:
                errors.append(exc)
                break
    if errors:
        for engine in engines:
            engine.shutdown()
        raise errors[0]
    return engines


class GlobalScheduler:
    """Routes requests to worker groups and streams their outputs (see module doc).

    Implements `raylm.cluster.backend.Backend`. Needs a running asyncio loop; the step
    loops start on first use (or `await start()`)."""

    def __init__(self, engine_args: EngineArgs, num_groups: int = 1,
                 served_model_name: Optional[str] = None, overlap: bool = True):
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        self.engine_args = engine_args
        self.groups = [_GroupState(e) for e in _build_engines(engine_args, num_groups)]
        first = self.groups[0].engine
        self.tokenizer = first.tokenizer
        self.max_model_len = first.max_model_len
        self.max_logprobs = engine_args.max_logprobs
        self.block_size = engine_args.block_size
        self.model_dir = first.model_dir
        self.model_name = served_model_name or engine_args.model or DEFAULT_SERVED_NAME
        self.metrics = EngineMetrics(self.model_name, self.group_stats)
        self.streams: dict[str, _Stream] = {}
        self.overlap = overlap  # False only to measure what overlapping gains
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("the scheduler has been shut down")
        for i, g in enumerate(self.groups):
            if g.task is None:
                g.wake = asyncio.Event()
                g.task = asyncio.get_running_loop().create_task(self._run_group(i))

    async def shutdown(self) -> None:
        self._closed = True
        for rid in list(self.streams):
            self._abort(rid)
        for g in self.groups:
            if g.task is not None:
                g.task.cancel()
                try:
                    await g.task
                except (asyncio.CancelledError, Exception):
                    pass
            g.engine.shutdown()

    # ---- routing -------------------------------------------------------------------
    def _load(self, g: _GroupState) -> float:
        sch = g.engine.scheduler
        return (sch.num_running + sch.num_waiting) / sch.config.max_num_seqs + g.engine.block_manager.usage

    def _route(self, hashes: list[int]) -> int:
        alive = [i for i, g in enumerate(self.groups) if g.error is None]
        if not alive:
            raise RuntimeError("every worker group has failed: " + repr(self.groups[0].error))
        loads = {i: self._load(self.groups[i]) for i in alive}
        least = min(alive, key=lambda i: (loads[i], self.groups[i].steps))
        best, best_hit = least, 0
        for i in alive:
            g = self.groups[i]
            cached = g.engine.block_manager.num_cached_blocks(hashes)
            inflight = 0
            for h in hashes:
                if g.inflight_hashes[h] <= 0:
                    break
                inflight += 1
            hit = max(cached, inflight)
            if hit > best_hit and loads[i] - loads[least] <= AFFINITY_LOAD_SLACK:
                best, best_hit = i, hit
        return best

    # ---- requests (the Backend protocol) -------------------------------------------
    def _add(self, prompt: PromptType, params: SamplingParams, rid: str,
             sink: Optional[Callable]) -> _Stream:
        """Validate (ValueError on bad input), route and add one request."""
        self._ensure_started()
        if rid in self.streams:
            raise ValueError(f"request_id {rid!r} is already in use")
        engine = self.groups[0].engine
        text, ids = engine.validate(prompt, params)
        hashes = prefix_block_hashes(ids, self.block_size) if engine.args.enable_prefix_caching else []
        gi = self._route(hashes)
        group = self.groups[gi]
        group.requests += 1
        stream = _Stream(gi, None if sink else asyncio.Queue(), time.monotonic(), hashes, sink)
        group.engine.add_request(rid, prompt, params, validated=(text, ids))
        self.streams[rid] = stream
        group.inflight_hashes.update(hashes)
        group.wake.set()
        return stream

    def submit(self, prompt: PromptType, params: SamplingParams, request_id: str,
               sink: Callable) -> None:
        """Add a request whose outputs are handed to sink(request_id, item) as they come:
        cumulative RequestOutputs, the last finished, or an exception if its worker group
        fails. Bad input raises ValueError here. The Serve app's path (multiplex.py):
        one subscriber's requests share one stream; `abort` stops one."""
        self._add(prompt, params, request_id, sink)

    async def generate_stream(self, prompt: PromptType, params: SamplingParams,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as the request progresses; the last has finished=True.
        Closing the iterator early aborts the request and frees its blocks."""
        rid = request_id or uuid.uuid4().hex
        stream = self._add(prompt, params, rid, None)
        try:
            while True:
                # Outputs are cumulative: when the consumer fell behind, send only the newest.
                item = await next_item(stream.queue)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self._abort(rid)
            self._forget(rid)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: Optional[str] = None) -> RequestOutput:
        return await final_output(self.generate_stream(prompt, params, request_id))

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, rid: str) -> None:
        stream = self.streams.get(rid)
        if stream is None or stream.finished:
            return
        outputs = self.groups[stream.group].engine.abort_request(rid)
        self._deliver(outputs)

    def _forget(self, rid: str) -> None:
        stream = self.streams.pop(rid, None)
        if stream is not None:
            self.groups[stream.group].inflight_hashes.subtract(stream.hashes)
            self.groups[stream.group].inflight_hashes += Counter()  # drop zero counts

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None or stream.finished:
                continue
            if any(c.token_ids for c in out.outputs):
                if stream.last_time is None:
                    self.metrics.observe_first_token(now - stream.arrival)
                else:
                    self.metrics.observe_inter_token(now - stream.last_time)
                stream.last_time = now
            if out.finished:
                stream.finished = True
                reasons = [c.finish_reason for c in out.outputs]
                reason = "abort" if "abort" in reasons else reasons[0] or "abort"
                self.metrics.observe_finished(reason, now - stream.arrival)
            self._emit(out.request_id, stream, out)

    def _emit(self, rid: str, stream: _Stream, item) -> None:
        if stream.sink is None:
            stream.queue.put_nowait(item)
            return
        stream.sink(rid, item)
        if stream.finished:  # no iterator here to clean up after it
            self._forget(rid)

    # ---- the step loop of one group ------------------------------------------------
    async def _run_group(self, gi: int) -> None:
        group = self.groups[gi]
        engine = group.engine
        pending = None  # a recorded step whose outputs are not yet emitted
        try:
            if engine.async_scheduling:
                return await self._run_group_async(group)
            while True:
                planned = engine.begin_step()
                if planned is None:
                    if pending is not None:
                        self._deliver(engine.emit_step(pending))
                        pending = None
                        continue
                    await self._wait_for_work(group)
                    continue
                sched_out, plan = planned
                if not self.overlap and pending is not None:
                    self._deliver(engine.emit_step(pending))
                    pending = None
                group.mark_busy()
                running = asyncio.ensure_future(engine.executor.execute_async(plan))
                if pending is not None:  # overlap: emit step N while step N+1 computes
                    self._deliver(engine.emit_step(pending))
                    pending = None
                result = await running
                group.mark_idle()
                group.steps += 1
                pending = engine.record_step(sched_out, result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a worker died: fail this group's requests, keep the rest
            logger.exception("worker group %d failed", gi)
            group.error = exc
            for rid, stream in list(self.streams.items()):
                if stream.group == gi and not stream.finished:
                    stream.finished = True
                    self._emit(rid, stream, RuntimeError(f"worker group {gi} failed: {exc!r}"))

    @staticmethod
    async def _wait_for_work(group: _GroupState) -> None:
        """Nothing to schedule: poll while requests wait for room, else sleep until one
        is added."""
        if group.engine.has_unfinished_requests():
            await asyncio.sleep(0.005)  # nothing fits this instant
        else:
            group.wake.clear()
            await group.wake.wait()

    async def _run_group_async(self, group: _GroupState) -> None:
        """Asynchronous scheduling (the engine's async_scheduling): step N+1 is planned
        and launched before step N's tokens are back, so the workers always have the next
        step queued; step N is then recorded, detokenized and streamed."""
        engine = group.engine
        inflight = None  # (scheduler output, launched handle)

        async def complete(step) -> None:
            sched_out, handle = step
            result = await engine.executor.collect_async(handle)
            group.steps += 1
            self._deliver(engine.emit_step(engine.record_step(sched_out, result, launched=True)))

        while True:
            planned = engine.begin_step()
            if planned is None:
                if inflight is not None:
                    step, inflight = inflight, None
                    await complete(step)
                    continue
                group.mark_idle()
                await self._wait_for_work(group)
                continue
            sched_out, plan = planned
            if inflight is not None and engine.needs_current_outputs(sched_out):
                step, inflight = inflight, None
                await complete(step)
            group.mark_busy()
            handle = engine.executor.launch(plan)
            engine.mark_launched(sched_out)
            if inflight is not None:
                await complete(inflight)
            inflight = (sched_out, handle)

    # ---- introspection -------------------------------------------------------------
    def group_stats(self) -> list[dict]:
        return [dict(g.engine.stats(), steps=g.steps, requests_routed=g.requests, alive=g.error is None,
                     busy_s=g.busy_seconds())
                for g in self.groups]

    def stats(self) -> dict:
        per_group = self.group_stats()
        total = {k: sum(s[k] for s in per_group) for k in per_group[0]
                 if isinstance(per_group[0][k], (int, float)) and not isinstance(per_group[0][k], bool)}
        total["kv_cache_usage_perc"] = (sum(s["blocks_in_use"] for s in per_group)
                                        / sum(s["num_blocks"] for s in per_group))
        total["groups"] = per_group
        return total

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def check_health(self) -> None:
        failed = [i for i, g in enumerate(self.groups) if g.error is not None]
        if failed:
            raise RuntimeError(f"worker group(s) {failed} failed")

    def info(self) -> dict:
        return {"model_name": self.model_name, "max_model_len": self.max_model_len,
                "model_dir": self.model_dir,
                "tokenizer": self.engine_args.tokenizer or self.model_dir,
                "max_logprobs": self.engine_args.max_logprobs,
                "num_groups": len(self.groups)}
