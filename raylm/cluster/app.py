"""The Ray Serve application.

    Ingress replicas (FastAPI via @serve.ingress, gRPC, handle methods; scale out with
    num_replicas / autoscaling_config, `raylm serve --api-server-count N`): tokenize,
    detokenize, stop strings, OpenAI shapes; one output subscription per engine core
      -> Router (one replica): the request ledger; routes each request (prefix affinity
         from the block hashes each core publishes, load), admits or refuses (429),
         sees every group's stats; two messages per request, none per token
      -> engine cores, one Ray actor per worker group (`core_actor.py`), each running
         its group's continuous-batching loop in its own process

`build_app(args)` is the `import_path` target of `deploy/serve.yaml` and of `raylm serve`.
The Serve deployments reserve a fraction of a CPU (Serve's default is a whole one), so
the ingress, the router and two small groups fit on a 2-core machine.
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, AsyncIterator, Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from raylm.cluster.backend import PromptType
from raylm.cluster.core_actor import EngineCoreActor, RayCoreClient
from raylm.cluster.frontend import DEFAULT_MAX_REDISPATCHES, DEFAULT_QUEUE_TIMEOUT_S, Frontend, detached
from raylm.cluster.grpc_service import GrpcGenerateMixin
from raylm.cluster.local import DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_SERVED_NAME
from raylm.cluster.router import NoGroupAvailable, Overloaded, Router
from raylm.engine.config import EngineArgs
from raylm.engine.metrics import render_metrics
from raylm.engine.model_config import ModelConfig
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams

logger = logging.getLogger("raylm")

APP_NAME = "raylm"
APP_ARGS = ("num_groups", "served_model_name", "api_key", "max_n", "max_queued_requests",
            "api_server_count", "autoscaling_config", "http_host", "http_port", "step_timeout",
            "queue_timeout", "max_redispatches")
# Concurrent requests a replica accepts (Serve's default of 5 would serialise a server).
MAX_ONGOING_REQUESTS = 4096
INGRESS_NUM_CPUS = 0.1
ROUTER_NUM_CPUS = 0.1
# How often the router reads each core's snapshot (stats, prefix-cache changes).
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
    """One engine core actor per group, started at once. At TP=1 a core's actor holds its
    GPU share (num_gpus_per_worker). A larger group gets a STRICT_PACK placement group,
    one bundle per rank: its core actor sits in bundle 0 and holds rank 0 (and its GPU),
    its executor puts ranks 1.. in the other bundles; the group is removed with the core
    when this process (its creator) ends. If any fails, all are killed, the placement
    groups removed and its error raised."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raylm.engine.broadcast_executor import rank_bundles
    from raylm.engine.ray_executor import PLACEMENT_TIMEOUT_S

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
        if groups:
            ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups),
                                timeout=PLACEMENT_TIMEOUT_S)
            if len(ready) < len(groups):
                raise RuntimeError(
                    f"could not place {len(groups) - len(ready)} of {num_groups} worker group(s) of "
                    f"{tp} x {bundles[0]} on one node each within {PLACEMENT_TIMEOUT_S:.0f} s "
                    f"(tensor_parallel_size={tp}, num_cpus_per_worker={args.num_cpus_per_worker}); "
                    f"the cluster has {ray.available_resources()} available")
        ray.get([a.ready.remote() for a in actors], timeout=CORE_START_TIMEOUT_S)
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        for g in groups:
            remove_placement_group(g)
        raise
    return actors


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
                 step_timeout: float = DEFAULT_STEP_TIMEOUT_S):
        kwargs = dict(engine_args)
        kwargs["device"] = _resolve_cluster_device(kwargs.get("device", "auto"))
        self.args = EngineArgs(**kwargs)
        self.model = ModelConfig.from_args(self.args)
        self.model_name = served_model_name or self.args.model or DEFAULT_SERVED_NAME
        self.router = Router(num_groups, self.args.max_num_seqs, max_queued_requests, step_timeout)
        self.actors = start_cores(self.args, num_groups)
        self._poller: Optional[asyncio.Task] = None
        self._restarts: dict[int, asyncio.Task] = {}

    def __del__(self):
        import ray

        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
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
        while True:
            await self._refresh()
            await asyncio.sleep(POLL_S)

    async def _refresh(self, hashes: bool = True) -> list:
        groups = self.router.groups
        # Each answer counts only for the core generation it was asked of: a restart may
        # replace a group's core while the question is out.
        asked = [(g.generation, a.snapshot.remote(g.seq, hashes)) for g, a in zip(groups, self.actors)]
        snaps = []
        for i, (generation, ref) in enumerate(asked):
            try:
                snap = await ref
            except Exception as exc:  # the actor died
                if generation != groups[i].generation:
                    snaps.append(None)
                    continue
                if groups[i].alive and not getattr(self, "_closing", False):
                    logger.error("worker group %d failed: %s", i, type(exc).__name__)
                    self.router.mark_dead(i, f"the engine core process is gone ({type(exc).__name__})")
                    self._schedule_restart(i)
                snaps.append(None)
                continue
            if generation != groups[i].generation:
                snaps.append(None)
                continue
            if hashes and groups[i].alive:
                self.router.update(i, snap)
                if not groups[i].alive:  # its loop failed: a worker died
                    logger.error("worker group %d failed: %s", i, groups[i].error)
                    self._schedule_restart(i)
            snaps.append(snap)
        for i in self.router.watch():
            logger.error("worker group %d hung: %s", i, groups[i].error)
            self._schedule_restart(i)
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
    async def assign(self, request_id: str, hashes: list[int], num_seqs: int = 1,
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
        failed = [i for i, g in enumerate(self.router.groups) if not g.alive]
        if failed:
            raise RuntimeError(f"worker group(s) {failed} failed")

    async def health(self) -> dict:
        """Router.health: 'ok' while a group serves, each group's state."""
        self._ensure_polling()
        return self.router.health()

    async def stats(self) -> dict:
        await self._refresh()
        return self.router.stats()

    def info(self) -> dict:
        return {"model_name": self.model_name, "max_model_len": self.model.max_model_len,
                "num_groups": len(self.actors)}


class ServeRouterClient:
    """The router deployment as the frontend sees it (a `RouterClient`)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def assign(self, request_id: str, hashes: list[int], num_seqs: int,
                     redispatch: bool = False, failed_group: Optional[tuple] = None) -> tuple[int, int]:
        answer = await self.handle.assign.remote(request_id, hashes, num_seqs, redispatch, failed_group)
        if answer[0] == "ok":
            return answer[1], answer[2]
        if answer[0] == "overloaded":
            raise Overloaded(answer[1], answer[2])
        if answer[0] == "unavailable":
            raise NoGroupAvailable(answer[1])
        raise ValueError(answer[1])

    def release(self, request_ids: list[str]) -> None:
        detached(self._release(request_ids))

    async def _release(self, request_ids: list[str]) -> None:
        await self.handle.release.remote(request_ids)

    async def metrics_text(self) -> bytes:
        return await self.handle.metrics_text.remote()

    async def health(self) -> dict:
        return await self.handle.health.remote()

    async def check_health(self) -> None:
        try:
            await self.handle.groups_serving.remote()
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            raise RuntimeError(str(cause) if cause is not None else "the router cannot be reached") from None


class ClusterFrontend(Frontend):
    """The frontend of an ingress replica: it learns the core actors from the router on
    first use."""

    def __init__(self, router: DeploymentHandle, *args, **kwargs):
        super().__init__(ServeRouterClient(router), [], *args, **kwargs)
        self._router_handle = router
        self._started: Optional[asyncio.Future] = None

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                cores = await self._router_handle.cores.remote()
                self.core_clients = [RayCoreClient(a, i, gen) for i, (gen, a) in enumerate(cores)]
                self._generations = {i: gen for i, (gen, _) in enumerate(cores)}
                self._ensure_subscribed()
                self._started.set_result(True)
            except BaseException as exc:
                self._started.set_exception(exc)
                self._started = None
                raise
        else:
            await self._started

    async def _refresh_core(self, gi: int) -> None:
        """Group gi was restarted: talk to its new core actor."""
        cores = await self._router_handle.cores.remote()
        self.core_clients[gi].unsubscribe(self.subscriber)
        self.core_clients[gi] = RayCoreClient(cores[gi][1], gi, cores[gi][0])
        self._subscribe_core(gi)


def serve_directly(app, host: str, port: int):
    """Serve `app` on host:port from this process with uvicorn, on the running event
    loop, through a socket bound with SO_REUSEPORT: every ingress replica on a node
    binds the same port and the kernel spreads connections over them. HTTP then goes
    from the client to the replica that holds the tokenizer and the cores' streams, with
    no proxy process carrying each token. Returns the uvicorn server."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                           timeout_keep_alive=60))
    asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    return server


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
                  max_ongoing_requests=MAX_ONGOING_REQUESTS, logging_config=_QUIET)
@serve.ingress()
class Ingress(GrpcGenerateMixin):
    """HTTP (OpenAI API), gRPC (`Generate` service) and Python-handle entry points."""

    def __init__(self, router: DeploymentHandle, engine_args: dict,
                 served_model_name: Optional[str] = None, api_key: Optional[str] = None,
                 max_n: int = 16, http_host: str = "127.0.0.1", http_port: Optional[int] = None,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
                 max_redispatches: int = DEFAULT_MAX_REDISPATCHES):
        args = EngineArgs(**engine_args)
        model = ModelConfig.from_args(args, check_support=False)
        name = served_model_name or args.model or DEFAULT_SERVED_NAME
        self.backend = ClusterFrontend(router, model.load_tokenizer(), name, model.max_model_len,
                                       model.vocab_size, args.max_logprobs, args.block_size,
                                       args.enable_prefix_caching, queue_timeout, max_redispatches)
        self.api_key = api_key
        self.max_n = max_n
        self.direct = None
        if http_port is not None:  # HTTP straight into this replica as well (see serve_directly)
            from raylm.cluster.openai_api import create_openai_app

            self.direct = serve_directly(create_openai_app(self.backend, api_key=api_key, max_n=max_n),
                                         http_host, http_port)

    def __del__(self):
        """Serve calls this at shutdown: stop the direct listener, end the subscriptions."""
        if getattr(self, "direct", None) is not None:
            self.direct.should_exit = True
        backend = getattr(self, "backend", None)  # None if __init__ failed
        if backend is not None:
            backend.unsubscribe_all()

    def __serve_build_asgi_app__(self):
        from raylm.cluster.openai_api import create_openai_app

        return create_openai_app(self.backend, api_key=self.api_key, max_n=self.max_n)

    # ---- the Python handle API (trusted Ray apps in the same cluster) --------------
    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> RequestOutput:
        """The final RequestOutput of one request."""
        return await self.backend.generate(prompt, sampling_params or SamplingParams(), request_id)

    async def generate_stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs as the request progresses (use with stream=True)."""
        async for out in self.backend.generate_stream(prompt, sampling_params or SamplingParams(), request_id):
            yield out


def _positive_int(app_args: dict, name: str, default: int, minimum: int = 1) -> int:
    value = app_args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def build_app(args: Optional[dict] = None):
    """The application for `serve run`/`serve deploy` (`args` from the YAML) and `raylm serve`.

    `args`: engine arguments by their EngineArgs (vLLM) names, plus num_groups,
    served_model_name, api_key (or $RAYLM_API_KEY), max_n (the largest `n` allowed),
    max_queued_requests (waiting requests past which a request gets 429),
    api_server_count (ingress replicas) or autoscaling_config (Serve's, for the ingress),
    http_port (and http_host, default 127.0.0.1): every ingress replica also serves the
    OpenAI API itself on that port (SO_REUSEPORT), bypassing Serve's HTTP proxy;
    step_timeout (a group holding work with no step for that long is hung: restarted, its
    requests moved), queue_timeout (how long a request waits for a serving group before a
    503), max_redispatches (how often one request may be moved)."""
    args = dict(args or {})
    app_args = {k: args.pop(k) for k in APP_ARGS if k in args}
    unknown = sorted(set(args) - set(EngineArgs.field_names()))
    if unknown:
        raise ValueError(f"unknown raylm argument(s) {unknown}; known: engine arguments "
                         f"{EngineArgs.field_names()} and {list(APP_ARGS)}")
    EngineArgs(**args)  # bad values fail here, before anything is deployed
    num_groups = _positive_int(app_args, "num_groups", 1)
    max_n = _positive_int(app_args, "max_n", 16)
    max_queued = _positive_int(app_args, "max_queued_requests", DEFAULT_MAX_QUEUED_REQUESTS, 0)
    replicas = _positive_int(app_args, "api_server_count", 1)
    autoscaling: Any = app_args.get("autoscaling_config")
    if autoscaling is not None and not isinstance(autoscaling, dict):
        raise ValueError(f"autoscaling_config must be a mapping, got {autoscaling!r}")
    if autoscaling is not None and "api_server_count" in app_args:
        raise ValueError("set api_server_count or autoscaling_config, not both")
    served = app_args.get("served_model_name")
    api_key = app_args.get("api_key") or os.environ.get("RAYLM_API_KEY") or None
    http_host = app_args.get("http_host") or "127.0.0.1"
    http_port = app_args.get("http_port")
    if http_port is not None and (not isinstance(http_port, int) or not 0 < http_port < 65536):
        raise ValueError(f"http_port must be a port number in 1..65535, got {http_port!r}")
    timeouts = {}
    for name, default in (("step_timeout", DEFAULT_STEP_TIMEOUT_S), ("queue_timeout", DEFAULT_QUEUE_TIMEOUT_S)):
        value = app_args.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        timeouts[name] = float(value)
    max_redispatches = _positive_int(app_args, "max_redispatches", DEFAULT_MAX_REDISPATCHES, 0)
    router = RouterDeployment.bind(args, num_groups, served, max_queued, timeouts["step_timeout"])
    ingress = (Ingress.options(autoscaling_config=autoscaling) if autoscaling is not None
               else Ingress.options(num_replicas=replicas))
    return ingress.bind(router, args, served, api_key, max_n, http_host, http_port,
                        timeouts["queue_timeout"], max_redispatches)
