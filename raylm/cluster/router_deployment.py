"""The router deployment: it starts one engine core actor per worker group, follows their
snapshots (each core pushes one every POLL_S on a connection the router opens to it, with
no Ray call each), routes and admits requests (`raylm.cluster.router.Router`), notices
dead or hung groups and restarts them. `ServeRouterClient` is the ingress replicas' view
of it.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Optional

import msgpack
from ray import serve
from ray.serve.handle import DeploymentHandle

from raylm.cluster.core_actor import EngineCoreActor, connect, read_frame
from raylm.cluster.frontend import detached
from raylm.cluster.local import DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_SERVED_NAME
from raylm.cluster.router import NoGroupAvailable, Overloaded, Router
from raylm.engine.config import EngineArgs
from raylm.engine.metrics import render_metrics
from raylm.engine.model_config import ModelConfig

logger = logging.getLogger("raylm")

# Concurrent requests a replica accepts (Serve's default of 5 would serialise a server).
MAX_ONGOING_REQUESTS = 4096
INGRESS_NUM_CPUS = 0.1
ROUTER_NUM_CPUS = 0.1
# How often each core sends the router its snapshot (stats, prefix-cache changes).
POLL_S = 0.05
CORE_START_TIMEOUT_S = 600
# A group holding work whose step counter has not moved this long is hung (vLLM has no such knob).
DEFAULT_STEP_TIMEOUT_S = 60.0


def _resolve_cluster_device(device: str) -> str:
    """The router replica sees no GPU itself; 'auto' follows the cluster's resources."""
    if device != "auto":
        return device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def start_cores(args: EngineArgs, num_groups: int) -> list:
    """One engine core actor per group, started at once (launch_cores, then wait_cores)."""
    return wait_cores(*launch_cores(args, num_groups), args)


def launch_cores(args: EngineArgs, num_groups: int) -> tuple[list, list]:
    """Create one engine core actor per group without waiting for them: (actors, their
    placement groups). At TP=1 a core's actor holds its GPU share (num_gpus_per_worker).
    A larger group gets a STRICT_PACK placement group, one bundle per rank: its core actor
    sits in bundle 0 and holds rank 0 (and its GPU), its executor puts ranks 1.. in the
    other bundles; the group is removed with the core when this process (its creator)
    ends."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raylm.engine.broadcast_executor import rank_bundles

    on_gpu = args.device.startswith("cuda")
    tp = args.tensor_parallel_size
    backend = str(args.distributed_executor_backend)
    rank0_in_core = tp > 1 and backend != "ray" and ":" not in backend  # see EngineCoreActor
    cls = ray.remote(EngineCoreActor)
    actors, groups = [], []
    try:
        for i in range(num_groups):
            name = f"raylm-core-{uuid.uuid4().hex[:8]}-{i}"
            options = dict(name=name, max_concurrency=1000, max_restarts=0,
                           num_cpus=args.num_cpus_per_worker if tp == 1 else 0,
                           num_gpus=args.num_gpus_per_worker if on_gpu and tp == 1 else 0)
            if rank0_in_core:
                bundles = rank_bundles(tp, args.num_cpus_per_worker, on_gpu)
                groups.append(placement_group(bundles, strategy="STRICT_PACK", name=f"{name}-ranks"))
                options.update(num_cpus=bundles[0].get("CPU", 0), num_gpus=bundles[0].get("GPU", 0),
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   groups[-1], placement_group_bundle_index=0))
            actors.append(cls.options(**options).remote(_engine_dict(args), i))
            actors[-1]._raylm_name = name  # to remove its placement group after a restart
    except BaseException:
        kill_cores(actors, groups)
        raise
    return actors, groups


def wait_cores(actors: list, groups: list, args: EngineArgs) -> list:
    """Wait until every launched core serves; if any fails (or its placement group cannot
    be placed), all are killed, the placement groups removed and the error raised."""
    import ray

    from raylm.engine.ray_executor import PLACEMENT_TIMEOUT_S

    try:
        if groups:
            ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups),
                                timeout=PLACEMENT_TIMEOUT_S)
            if len(ready) < len(groups):
                from raylm.engine.broadcast_executor import rank_bundles

                tp, cpus = args.tensor_parallel_size, args.num_cpus_per_worker
                raise RuntimeError(
                    f"could not place {len(groups) - len(ready)} of {len(groups)} worker group(s) of "
                    f"{tp} x {rank_bundles(tp, cpus, args.device.startswith('cuda'))[0]} on one node "
                    f"each within {PLACEMENT_TIMEOUT_S:.0f} s (tensor_parallel_size={tp}, "
                    f"num_cpus_per_worker={cpus}); the cluster has {ray.available_resources()} available")
        ray.get([a.ready.remote() for a in actors], timeout=CORE_START_TIMEOUT_S)
    except BaseException:
        kill_cores(actors, groups)
        raise
    return actors


def kill_cores(actors: list, groups: list) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        ray.kill(a, no_restart=True)
    for g in groups:
        remove_placement_group(g)


def _engine_dict(args: EngineArgs) -> dict:
    import dataclasses

    return dataclasses.asdict(args)


# Serve logs every call at INFO; per request that is a log line per hop.
_QUIET = {"enable_access_log": False}


@serve.deployment(name="Router", ray_actor_options={"num_cpus": ROUTER_NUM_CPUS},
                  max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10,
                  logging_config=_QUIET)
class RouterDeployment:
    """Starts the engine cores and routes requests to them (see module doc)."""

    def __init__(self, engine_args: dict, num_groups: int = 1, served_model_name: Optional[str] = None,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
                 step_timeout: float = DEFAULT_STEP_TIMEOUT_S, shutdown_wait: float = 0.0):
        from raylm.cluster.startup import StartupMarks

        self.startup = StartupMarks("router")
        self.startup.mark("init_start")
        self.shutdown_wait = shutdown_wait  # at shutdown, how long the cores may finish work
        kwargs = dict(engine_args)
        kwargs["device"] = _resolve_cluster_device(kwargs.get("device", "auto"))
        self.args = EngineArgs(**kwargs)
        # The cores start first: the model config (which imports torch here) and the
        # router's own set-up overlap with their start.
        self.startup.mark("cores_starting")
        launched = launch_cores(self.args, num_groups)
        try:
            self.model = ModelConfig.from_args(self.args)
        except BaseException:
            kill_cores(*launched)
            raise
        self.model_name = served_model_name or self.args.model or DEFAULT_SERVED_NAME
        self.router = Router(num_groups, self.args.max_num_seqs, max_queued_requests, step_timeout)
        self.actors = wait_cores(*launched, self.args)
        self.startup.mark("cores_ready")
        self._poller: Optional[asyncio.Task] = None
        self._followers: dict[tuple[int, int], asyncio.Task] = {}  # (group, generation) -> _follow
        self._pushed = 0  # snapshots read from the cores' connections
        self._restarts: dict[int, asyncio.Task] = {}

    async def __del__(self):
        """At shutdown, keep the cores until they hold no work (the ingress replicas
        drain meanwhile, see raylm.cluster.drain) or shutdown_wait passes; then kill them."""
        import time

        import ray

        if getattr(self, "actors", None) and getattr(self, "shutdown_wait", 0) > 0:
            self._ensure_polling()
            deadline, idle_since = time.monotonic() + self.shutdown_wait, None
            while time.monotonic() < deadline:  # idle for 0.5 s: nothing more is coming
                busy = any(g.alive and (g.stats.get("num_requests_running", 0) or
                                        g.stats.get("num_requests_waiting", 0)) for g in self.router.groups)
                idle_since = None if busy else (idle_since or time.monotonic())
                if idle_since is not None and time.monotonic() - idle_since >= 0.5:
                    break
                await asyncio.sleep(POLL_S)
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
        for task in getattr(self, "_followers", {}).values():
            task.cancel()
        self._closing = True
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass

    # ---- snapshots -----------------------------------------------------------------
    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = detached(self._poll())

    async def _poll(self) -> None:
        """Follow each group's core (its snapshots arrive on a connection of their own)
        and mark hung groups."""
        while True:
            for gi, g in enumerate(self.router.groups):
                key = (gi, g.generation)
                if g.alive and key not in self._followers:
                    self._followers = {k: t for k, t in self._followers.items() if not t.done()}
                    self._followers[key] = detached(self._follow(gi, g.generation, self.actors[gi]))
            for i in self.router.watch():
                logger.error("worker group %d hung: %s", i, self.router.groups[i].error)
                self._schedule_restart(i)
            await asyncio.sleep(POLL_S)

    async def _follow(self, gi: int, generation: int, actor) -> None:
        """Apply core gi's pushed snapshots (EngineCoreActor.open_snapshots) while it
        is the group's core. When the connection ends, a Ray call says whether the core
        is gone (the group is marked dead and restarted) or only the connection was; then
        a new one is opened."""
        groups = self.router.groups
        while not getattr(self, "_closing", False) and groups[gi].generation == generation and groups[gi].alive:
            writer = None
            try:
                where = await self._ask(gi, generation, actor.open_snapshots.remote(groups[gi].seq, POLL_S))
                if where is None:
                    return
                reader, writer = await connect(where)
                while True:
                    snap = msgpack.unpackb(await read_frame(reader), strict_map_key=False)
                    self._pushed += 1
                    if not self._take(gi, generation, snap):
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection ended: the core, or only the connection?
                logger.info("worker group %d: snapshot connection ended: %s", gi, type(exc).__name__)
            finally:
                if writer is not None:
                    writer.close()
            snap = await self._ask(gi, generation, actor.snapshot.remote(groups[gi].seq))
            if snap is None or not self._take(gi, generation, snap):
                return
            await asyncio.sleep(POLL_S)

    async def _ask(self, gi: int, generation: int, ref):
        """A Ray call's answer from core gi; None when the group has moved on to a newer
        core meanwhile, or when the call failed: the actor died, and the group is marked
        dead and restarted."""
        groups = self.router.groups
        try:
            answer = await ref
        except Exception as exc:  # the actor died
            if generation == groups[gi].generation and groups[gi].alive and not getattr(self, "_closing", False):
                logger.error("worker group %d failed: %s", gi, type(exc).__name__)
                self.router.mark_dead(gi, f"the engine core process is gone ({type(exc).__name__})")
                self._schedule_restart(gi)
            return None
        return answer if generation == groups[gi].generation else None

    def _take(self, gi: int, generation: int, snap: dict) -> bool:
        """Apply a snapshot of core gi if it is still the group's core and the group
        serves; returns whether it did (a core whose loop failed is marked dead and
        restarted)."""
        g = self.router.groups[gi]
        if generation != g.generation or not g.alive:
            return False
        self.router.update(gi, snap)
        if not g.alive:  # its loop failed: a worker died
            logger.error("worker group %d failed: %s", gi, g.error)
            self._schedule_restart(gi)
            return False
        return True

    async def _refresh(self, hashes: bool = True) -> list:
        """Every core's snapshot now, by Ray call (for /metrics and stats, which must be
        current; the pushed ones are up to POLL_S old)."""
        groups = self.router.groups
        # Each answer counts only for the core generation it was asked of: a restart may
        # replace a group's core while the question is out.
        asked = [(g.generation, a.snapshot.remote(g.seq, hashes)) for g, a in zip(groups, self.actors)]
        snaps = []
        for i, (generation, ref) in enumerate(asked):
            snap = await self._ask(i, generation, ref)
            if snap is not None and hashes:
                self._take(i, generation, snap)
            snaps.append(snap)
        return snaps

    # ---- restarts ------------------------------------------------------------------
    def _schedule_restart(self, gi: int) -> None:
        if getattr(self, "_closing", False):
            return
        task = self._restarts.get(gi)
        if task is None or task.done():
            self._restarts[gi] = detached(self._restart(gi))

    async def _restart(self, gi: int) -> None:
        """A new core for group gi (the same engine arguments), after the router's
        back-off; retried until one starts. The old actor is killed first, so its GPU is
        free for the new one."""
        import ray

        while not getattr(self, "_closing", False):
            await asyncio.sleep(self.router.restarting(gi))
            old = self.actors[gi]
            try:
                ray.kill(old, no_restart=True)
            except Exception:
                pass
            name = getattr(old, "_raylm_name", None)
            if name is not None and self.args.tensor_parallel_size > 1:
                try:  # its ranks' placement group (start_cores names it)
                    from ray.util.placement_group import get_placement_group, remove_placement_group

                    remove_placement_group(get_placement_group(f"{name}-ranks"))
                except Exception:
                    pass
            try:
                (new,) = await asyncio.to_thread(start_cores, self.args, 1)
            except Exception as exc:
                logger.error("worker group %d: restart failed: %s", gi, type(exc).__name__)
                self.router.mark_dead(gi, f"restart failed ({type(exc).__name__})")
                continue
            self.actors[gi] = new
            self.router.restarted(gi)
            logger.warning("worker group %d restarted", gi)
            return

    # ---- per request ---------------------------------------------------------------
    async def assign_many(self, items: list) -> list:
        """_assign's answer for each (request_id, hashes, num_seqs, redispatch, failed_group),
        in order: an ingress replica sends the requests that arrived while its previous
        call was in flight in one call (a Serve call costs the router about a millisecond,
        the routing itself some microseconds)."""
        return [self._assign(*item) for item in items]

    def _assign(self, request_id: str, hashes: list[int], num_seqs: int = 1,
                redispatch: bool = False, failed_group: Optional[tuple] = None) -> tuple:
        """("ok", group, its core's generation) or ("overloaded", message, retry_after)
        or ("unavailable", message) or ("invalid", message). failed_group: (group,
        generation) the caller saw die (marked dead now and restarted)."""
        self._ensure_polling()
        if failed_group is not None and self.router.report_failure(tuple(failed_group)):
            logger.error("worker group %d failed (seen by an ingress replica)", failed_group[0])
            self._schedule_restart(failed_group[0])
        try:
            gi = self.router.assign(request_id, hashes, num_seqs, redispatch)
            return ("ok", gi, self.router.groups[gi].generation)
        except Overloaded as exc:
            return ("overloaded", str(exc), exc.retry_after)
        except NoGroupAvailable as exc:
            return ("unavailable", str(exc))
        except ValueError as exc:
            return ("invalid", str(exc))

    async def release(self, request_ids: list[str]) -> None:
        self.router.release(request_ids)

    async def cores(self) -> list:
        """(generation, engine core actor) of each group."""
        self.router.calls["cores"] += 1
        self._ensure_polling()
        return [(g.generation, a) for g, a in zip(self.router.groups, self.actors)]

    # ---- whole-server views --------------------------------------------------------
    async def metrics_text(self) -> bytes:
        self.router.calls["metrics_text"] += 1
        snaps = await self._refresh(hashes=False)
        live = [(s["stats"], s["metrics"]) for s in snaps if s is not None]
        return render_metrics(self.model_name, [s for s, _ in live], [m for _, m in live],
                              **self.router.metrics_view())

    async def groups_serving(self) -> None:
        """Raise unless every group serves. (Not named check_health: Serve calls that as
        the replica's own health check and would restart the router, with every core.)"""
        self.router.calls["groups_serving"] += 1
        await self._refresh(hashes=False)
        self.router.check_all_serving()

    async def health(self) -> dict:
        """Router.health: 'ok' while a group serves, each group's state."""
        self._ensure_polling()
        return self.router.health()

    async def stats(self) -> dict:
        await self._refresh()
        return dict(self.router.stats(), snapshots_pushed=self._pushed)

    async def startup_marks(self) -> list:
        """The start-up marks of this replica and of every engine core (raylm.cluster.startup)."""
        cores = await asyncio.gather(*(a.startup_marks.remote() for a in self.actors))
        return [self.startup.to_dict()] + list(cores)

    def info(self) -> dict:
        return {"model_name": self.model_name, "max_model_len": self.model.max_model_len,
                "num_groups": len(self.actors)}


# /health answers from the router's view fetched at most this long ago, refreshing it in
# the background once it is older than HEALTH_REFRESH_S: a probe never waits on the hop to a
# router that is busy (or on a loaded host), and a change of group state shows within
# HEALTH_MAX_AGE_S.
HEALTH_REFRESH_S = 0.1
HEALTH_MAX_AGE_S = 0.5
# The most requests one Router.assign_many call carries.
ASSIGN_BATCH_MAX = 512


class ServeRouterClient:
    """The router deployment as the frontend sees it (a `RouterClient`)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self._health: Optional[tuple[float, dict]] = None  # (monotonic time, Router.health)
        self._health_refresh: Optional[asyncio.Task] = None
        # assign's requests waiting for the call in flight to return, with their futures
        self._assigns: list[tuple[tuple, asyncio.Future]] = []
        self._assigner: Optional[asyncio.Task] = None

    async def assign(self, request_id: str, hashes: list[int], num_seqs: int,
                     redispatch: bool = False, failed_group: Optional[tuple] = None) -> tuple[int, int]:
        """One call to the router at a time from this replica: the requests that arrive
        while it is in flight go together in the next (Router.assign_many). A burst of
        requests then costs the router a few calls, not one each: at about a millisecond
        a Serve call, 2,048 streams opening at once waited up to 2.6 s for their group."""
        future = asyncio.get_running_loop().create_future()
        self._assigns.append(((request_id, list(hashes), num_seqs, redispatch, failed_group), future))
        if self._assigner is None or self._assigner.done():
            self._assigner = detached(self._send_assigns())
        answer = await future  # cancelled with its caller: _send_assigns then releases it
        if answer[0] == "ok":
            return answer[1], answer[2]
        if answer[0] == "overloaded":
            raise Overloaded(answer[1], answer[2])
        if answer[0] == "unavailable":
            raise NoGroupAvailable(answer[1])
        raise ValueError(answer[1])

    async def _send_assigns(self) -> None:
        while self._assigns:
            batch, self._assigns = self._assigns[:ASSIGN_BATCH_MAX], self._assigns[ASSIGN_BATCH_MAX:]
            try:
                answers = await self.handle.assign_many.remote([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch + self._assigns:
                    future.cancel()
                self._assigns = []
                raise
            except Exception as exc:  # the router cannot be reached: each caller sees why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            orphans = []
            for (item, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)
                elif answer[0] == "ok" and not item[3]:  # its caller left: nobody will release it
                    orphans.append(item[0])
            if orphans:
                self.release(orphans)

    def release(self, request_ids: list[str]) -> None:
        detached(self._release(request_ids))

    async def _release(self, request_ids: list[str]) -> None:
        await self.handle.release.remote(request_ids)

    async def metrics_text(self) -> bytes:
        return await self.handle.metrics_text.remote()

    async def health(self) -> dict:
        now = asyncio.get_running_loop().time()
        cached = self._health
        if cached is not None and now - cached[0] < HEALTH_MAX_AGE_S:
            if now - cached[0] >= HEALTH_REFRESH_S and (self._health_refresh is None or self._health_refresh.done()):
                self._health_refresh = asyncio.ensure_future(self._refresh_health())
            return cached[1]
        return await self._fetch_health()

    async def _refresh_health(self) -> None:
        try:
            await self._fetch_health()
        except Exception:  # the next probe past HEALTH_MAX_AGE_S asks again, and reports it
            pass

    async def _fetch_health(self) -> dict:
        t = asyncio.get_running_loop().time()
        body = await self.handle.health.remote()
        self._health = (t, body)
        return body

    async def check_health(self) -> None:
        try:
            await self.handle.groups_serving.remote()
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            raise RuntimeError(str(cause) if cause is not None else "the router cannot be reached") from None
