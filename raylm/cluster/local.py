"""The cluster in one process: engine cores in threads of this process, the router and
the frontend beside them. The same code as the Serve application minus the process
boundaries: tests, benchmarks and embedding use it (`LocalCluster`), and it is a `Backend`
the HTTP and gRPC fronts can serve directly.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from raylm.cluster.frontend import DEFAULT_MAX_REDISPATCHES, DEFAULT_QUEUE_TIMEOUT_S, Frontend
from raylm.cluster.router import Router
from raylm.engine.config import EngineArgs
from raylm.engine.core import EngineCore, EngineCoreRequest
from raylm.engine.core_loop import CoreLoop
from raylm.engine.metrics import render_metrics
from raylm.engine.model_config import ModelConfig
from raylm.engine.structured_outputs import grammar_config

logger = logging.getLogger("raylm")

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
# Waiting sequences the router admits beyond what every group runs at once (SGLang's
# --max-queued-requests); past it a request gets 429 with Retry-After.
DEFAULT_MAX_QUEUED_REQUESTS = 4096


class LocalCoreClient:
    """An engine core running in a thread of this process (a `CoreClient`)."""

    def __init__(self, core: EngineCore, name: str = "raylm-core"):
        self.core = core
        self.generation = 0  # of its group's core (bumped at each restart)
        self.loop = CoreLoop(core, self._deliver, name).start()
        self._aio: Optional[asyncio.AbstractEventLoop] = None
        self._subs: dict = {}

    def _deliver(self, batches: dict) -> None:  # on the core's thread
        if self._aio is not None:
            self._aio.call_soon_threadsafe(self._dispatch, batches)

    def _dispatch(self, batches: dict) -> None:
        for sub, outs in batches.items():
            entry = self._subs.get(sub)
            if entry is not None:
                entry[0](outs)

    async def add(self, requests: list[EngineCoreRequest]) -> None:
        self.loop.add(requests)

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        if self.loop.alive:
            self.loop.abort(request_ids, reason)

    def subscribe(self, subscriber: str, on_batch, on_error) -> None:
        self._aio = asyncio.get_running_loop()
        self._subs[subscriber] = (on_batch, on_error)

    def unsubscribe(self, subscriber: str) -> None:
        self._subs.pop(subscriber, None)

    def shutdown(self) -> None:
        self.loop.stop()
        self.core.shutdown()

    def shutdown_quietly(self) -> None:
        """Shut a failed core down; its loop may be stuck in a step (then it is left to
        its daemon thread, its executor shut down under it)."""
        self.loop.stop(timeout=1.0)
        try:
            self.core.shutdown()
        except Exception as exc:  # a dead executor may not shut down cleanly
            logger.warning("shutting a failed core down: %s", exc)


class LocalRouterClient:
    """The router in this process, refreshed from the cores' snapshots as it routes. A
    core that failed (its loop stopped) or hung is restarted by `restart(group)`."""

    def __init__(self, router: Router, clients: list[LocalCoreClient], model_name: str, restart=None):
        self.router = router
        self.clients = clients
        self.model_name = model_name
        self.restart = restart

    def refresh(self) -> None:
        for i, c in enumerate(self.clients):
            g = self.router.groups[i]
            if g.state in ("restarting", "starting"):
                continue
            was = g.alive
            self.router.update(i, c.loop.snapshot(g.seq))
            if was and not g.alive and self.restart is not None:
                self.restart(i)
        for i in self.router.watch():
            if self.restart is not None:
                self.restart(i)

    async def assign(self, request_id: str, hashes: list[int], num_seqs: int,
                     redispatch: bool = False, failed_group: Optional[tuple[int, int]] = None
                     ) -> tuple[int, int]:
        self.refresh()
        if self.router.report_failure(failed_group) and self.restart is not None:
            self.restart(failed_group[0])
        gi = self.router.assign(request_id, hashes, num_seqs, redispatch)
        return gi, self.router.groups[gi].generation

    def release(self, request_ids: list[str]) -> None:
        self.router.release(request_ids)

    async def metrics_text(self) -> bytes:
        self.refresh()
        snaps = [c.loop.snapshot(-1) for c in self.clients]
        return render_metrics(self.model_name, [s["stats"] for s in snaps], [s["metrics"] for s in snaps],
                              **self.router.metrics_view())

    async def check_health(self) -> None:
        self.refresh()
        self.router.check_all_serving()

    async def health(self) -> dict:
        self.refresh()
        return self.router.health()


def build_cores(args: EngineArgs, num_groups: int, model: ModelConfig) -> list[EngineCore]:
    """One engine core per group. Cores whose ranks run in Ray actors start at once, one
    thread each (each mostly waits for its actors); in-process ones one by one, as they
    share this process's CPU. If any fails, the started ones are shut down and its
    error is raised."""
    on_ray = args.tensor_parallel_size > 1 or args.distributed_executor_backend == "ray"
    cores, errors = [], []
    if on_ray and num_groups > 1:
        with ThreadPoolExecutor(num_groups, thread_name_prefix="raylm-group") as pool:
            for future in [pool.submit(EngineCore, args, model) for _ in range(num_groups)]:
                try:
                    cores.append(future.result())
                except BaseException as exc:
                    errors.append(exc)
    else:
        for _ in range(num_groups):
            try:
                cores.append(EngineCore(args, model))
            except BaseException as exc:
                errors.append(exc)
                break
    if errors:
        for core in cores:
            core.shutdown()
        raise errors[0]
    return cores


class LocalCluster(Frontend):
    """`num_groups` engine cores in this process behind a router and a frontend."""

    def __init__(self, engine_args: EngineArgs, num_groups: int = 1,
                 served_model_name: Optional[str] = None,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
                 step_timeout: float = 60.0, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
                 max_redispatches: int = DEFAULT_MAX_REDISPATCHES):
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        self.engine_args = engine_args
        model = ModelConfig.from_args(engine_args)
        self.model = model
        self.cores = build_cores(engine_args, num_groups, model)
        self.clients = [LocalCoreClient(c, f"raylm-core-{i}") for i, c in enumerate(self.cores)]
        name = served_model_name or engine_args.model or DEFAULT_SERVED_NAME
        self.ledger = Router(num_groups, engine_args.max_num_seqs, max_queued_requests, step_timeout)
        self.router_client = LocalRouterClient(self.ledger, self.clients, name, self._schedule_restart)
        self._restarts: dict[int, asyncio.Task] = {}
        super().__init__(self.router_client, self.clients,
                         model.load_tokenizer(), name, model.max_model_len, model.vocab_size,
                         engine_args.max_logprobs, engine_args.block_size,
                         engine_args.enable_prefix_caching, queue_timeout, max_redispatches,
                         model.default_sampling, grammar_config(engine_args))

    # ---- restarts ------------------------------------------------------------------
    def _schedule_restart(self, gi: int) -> None:
        task = self._restarts.get(gi)
        if task is None or task.done():
            self._restarts[gi] = asyncio.get_running_loop().create_task(self._restart(gi))

    async def _restart(self, gi: int) -> None:
        """Replace group gi's core with a new one (same engine arguments), after the
        router's back-off; retried until it starts."""
        while True:
            await asyncio.sleep(self.ledger.restarting(gi))
            old = self.clients[gi]
            try:
                await asyncio.to_thread(old.shutdown_quietly)
                core = await asyncio.to_thread(EngineCore, self.engine_args, self.model)
            except Exception as exc:
                logger.error("worker group %d: restart failed: %s", gi, exc)
                self.ledger.mark_dead(gi, f"restart failed: {type(exc).__name__}")
                continue
            self.cores[gi] = core
            self.ledger.restarted(gi)
            client = LocalCoreClient(core, f"raylm-core-{gi}")
            client.generation = self.ledger.groups[gi].generation
            self.clients[gi] = client
            logger.warning("worker group %d restarted", gi)
            return

    def stats(self) -> dict:
        self.router_client.refresh()
        return self.ledger.stats()

    async def shutdown(self) -> None:
        for task in self._restarts.values():
            task.cancel()
        self.unsubscribe_all()
        for c in self.clients:
            c.shutdown()

    def info(self) -> dict:
        return {"model_name": self.model_name, "max_model_len": self.max_model_len,
                "model_dir": self.model.model_dir, "max_logprobs": self.max_logprobs,
                "num_groups": len(self.cores)}
