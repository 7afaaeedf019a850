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

The front door of each ingress replica: HTTP (`serve_directly`) and gRPC
(`grpc_server.serve_grpc`) bound to `http_host`, TLS with ssl_keyfile/ssl_certfile, the
API key on both, the body limit (`limits.py`), and a drain at shutdown (`drain.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any, AsyncIterator, Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from raylm.cluster.backend import PromptType
from raylm.cluster.core_actor import RayCoreClient
from raylm.cluster.drain import DEFAULT_SHUTDOWN_TIMEOUT_S, FLUSH_S, Drain
from raylm.cluster.frontend import DEFAULT_MAX_REDISPATCHES, DEFAULT_QUEUE_TIMEOUT_S, Frontend
from raylm.cluster.grpc_service import GrpcGenerateMixin, make_grpc_servicer
from raylm.cluster.limits import DEFAULT_MAX_REQUEST_BODY_BYTES, front_door
from raylm.cluster.local import DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_SERVED_NAME
from raylm.cluster.router_deployment import (_QUIET, DEFAULT_STEP_TIMEOUT_S, MAX_ONGOING_REQUESTS,
                                             RouterDeployment, ServeRouterClient)
from raylm.cluster.reasoning import check_reasoning_parser
from raylm.engine.structured_outputs import parse_structured_outputs_config
from raylm.cluster.tool_parsers import auto_tool_parser
from raylm.engine.config import EngineArgs
from raylm.engine.model_config import ModelConfig
from raylm.engine.structured_outputs import grammar_config
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams

logger = logging.getLogger("raylm")

APP_NAME = "raylm"
INGRESS_NUM_CPUS = 0.1
APP_ARGS = ("num_groups", "served_model_name", "api_key", "max_n", "max_queued_requests",
            "api_server_count", "autoscaling_config", "http_host", "http_port", "step_timeout",
            "queue_timeout", "max_redispatches", "grpc_port", "ssl_keyfile", "ssl_certfile",
            "max_request_body_bytes", "protect_health_metrics", "shutdown_timeout",
            "max_prompts_per_request", "max_seqs_per_request", "enable_auto_tool_choice", "tool_call_parser",
            "reasoning_parser")
# The front door's app arguments and their defaults (see Ingress).
FRONT_DEFAULTS = dict(grpc_port=None, ssl_keyfile=None, ssl_certfile=None,
                      max_request_body_bytes=DEFAULT_MAX_REQUEST_BODY_BYTES,
                      protect_health_metrics=False, shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT_S,
                      max_prompts_per_request=1024, max_seqs_per_request=4096,
                      enable_auto_tool_choice=False, tool_call_parser=None,  # tool_choice "auto"
                      reasoning_parser=None)
# Serve kills a stopping replica after graceful_shutdown_timeout_s: past our drain.
_SERVE_GRACE_MARGIN_S = 15.0

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


def serve_directly(app, host: str, port: int, ssl_keyfile: Optional[str] = None,
                   ssl_certfile: Optional[str] = None):
    """Serve `app` on host:port from this process with uvicorn, on the running event
    loop, through a socket bound with SO_REUSEPORT: every ingress replica on a node
    binds the same port and the kernel spreads connections over them. HTTP then goes
    from the client to the replica that holds the tokenizer and the cores' streams, with
    no proxy process carrying each token. HTTPS with ssl_keyfile and ssl_certfile.
    Returns the uvicorn server."""
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
                                           timeout_keep_alive=60, ssl_keyfile=ssl_keyfile,
                                           ssl_certfile=ssl_certfile))
    server.config.load()  # a bad key or certificate fails here, in __init__
    loop = asyncio.get_running_loop()
    warn_slow_http_stack(server.config.http_protocol_class.__name__, type(loop).__module__)
    loop.create_task(server.serve(sockets=[sock]))
    return server


def warn_slow_http_stack(protocol: str, loop_module: str) -> bool:
    """Warn when an ingress serves HTTP without uvicorn[standard]'s C parts: the pure-
    Python h11 parser instead of httptools, asyncio's own event loop instead of uvloop
    (Ray uses uvloop where installed, unless RAY_USE_UVLOOP=0). Each streamed token then
    costs the ingress more CPU (on the 2-core CPU h11 alone cost about 23 % more a token,
    both together about 8 % more before the cores' outputs moved to sockets). True if it
    warned."""
    slow = [what for what, ok in (("httptools (uvicorn is using the pure-Python h11 parser)",
                                   not protocol.startswith("H11")),
                                  ("uvloop (the event loop is asyncio's own)", loop_module.startswith("uvloop")))
            if not ok]
    if slow:
        logger.warning("ingress: serving HTTP without %s: each streamed token costs more CPU; "
                       "`pip install 'uvicorn[standard]'` installs both", " and without ".join(slow))
    return bool(slow)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
                  max_ongoing_requests=MAX_ONGOING_REQUESTS, logging_config=_QUIET)
@serve.ingress()
class Ingress(GrpcGenerateMixin):
    """HTTP (OpenAI API), gRPC (`Generate` service) and Python-handle entry points."""

    def __init__(self, router: DeploymentHandle, engine_args: dict,
                 served_model_name: Optional[str] = None, api_key: Optional[str] = None,
                 max_n: int = 16, http_host: str = "127.0.0.1", http_port: Optional[int] = None,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
                 max_redispatches: int = DEFAULT_MAX_REDISPATCHES, front: Optional[dict] = None):
        from raylm.cluster.startup import StartupMarks

        self.startup = StartupMarks("ingress")
        self.startup.mark("init_start")
        args = EngineArgs(**engine_args)
        model = ModelConfig.from_args(args, check_support=False)
        name = served_model_name or args.model or DEFAULT_SERVED_NAME
        self.backend = ClusterFrontend(router, model.load_tokenizer(), name, model.max_model_len,
                                       model.vocab_size, args.max_logprobs, args.block_size,
                                       args.enable_prefix_caching, queue_timeout, max_redispatches,
                                       model.default_sampling, grammar_config(args))
        self.front = dict(FRONT_DEFAULTS, **(front or {}))
        self.api_key = api_key
        self.max_n = max_n
        self.drain = Drain(self.front["shutdown_timeout"])
        tls = {k: self.front[k] for k in ("ssl_keyfile", "ssl_certfile")}
        self.direct = self.grpc = None
        if http_port is not None:  # HTTP straight into this replica as well (see serve_directly)
            self.direct = serve_directly(self._http_app(), http_host, http_port, **tls)
        if self.front["grpc_port"] is not None:  # gRPC likewise (see grpc_server)
            from raylm.cluster.grpc_server import serve_grpc

            servicer = make_grpc_servicer(self.backend, api_key, max_n, self.drain)
            self.grpc = serve_grpc(servicer, http_host, self.front["grpc_port"],
                                   max_message_bytes=self.front["max_request_body_bytes"], **tls)
        self.startup.mark("init_end")

    def _http_app(self):
        """The OpenAI app behind the front door: drain, API key, body limit."""
        from raylm.cluster.openai_api import create_openai_app

        app = create_openai_app(self.backend, max_n=self.max_n,  # the key is checked outside
                                enable_auto_tool_choice=self.front["enable_auto_tool_choice"],
                                tool_call_parser=self.front["tool_call_parser"],
                                reasoning_parser=self.front["reasoning_parser"],
                                max_prompts_per_request=self.front["max_prompts_per_request"],
                                max_seqs_per_request=self.front["max_seqs_per_request"])
        return front_door(app, self.api_key, self.front["protect_health_metrics"],
                          self.front["max_request_body_bytes"], self.drain)

    async def __del__(self):
        """Serve calls this at shutdown: drain (see drain.py), stop the listeners, end
        the subscriptions."""
        backend = getattr(self, "backend", None)  # None if __init__ failed
        drain = getattr(self, "drain", None)
        if backend is not None and drain is not None:
            await drain.run(lambda: backend.open_request_ids, backend.abort)
        if getattr(self, "direct", None) is not None:
            self.direct.should_exit = True
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(1.0)
        if backend is not None:
            backend.unsubscribe_all()

    def __serve_build_asgi_app__(self):
        return self._http_app()

    # ---- the Python handle API (trusted Ray apps in the same cluster) --------------
    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> RequestOutput:
        """The final RequestOutput of one request (without sampling_params, the model's
        generation_config defaults, as `LLM.generate`)."""
        return await self.backend.generate(prompt, sampling_params or self._default_params(), request_id)

    async def generate_stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs as the request progresses (use with stream=True)."""
        async for out in self.backend.generate_stream(prompt, sampling_params or self._default_params(),
                                                      request_id):
            yield out

    async def startup_marks(self) -> dict:
        """This replica's start-up marks (raylm.cluster.startup)."""
        return self.startup.to_dict()

    def _default_params(self) -> SamplingParams:
        return SamplingParams(**self.backend.default_sampling)


def _positive_int(app_args: dict, name: str, default: int, minimum: int = 1) -> int:
    value = app_args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _port(app_args: dict, name: str) -> Optional[int]:
    port = app_args.get(name)
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise ValueError(f"{name} must be a port number in 1..65535, got {port!r}")
    return port


def _seconds(app_args: dict, name: str, default: float, minimum: float = 0.0,
             allow_minimum: bool = False) -> float:
    value = app_args.get(name, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (value >= minimum if allow_minimum else value > minimum))
    if not ok:
        raise ValueError(f"{name} must be a number of seconds {'>=' if allow_minimum else '>'} "
                         f"{minimum:g}, got {value!r}")
    return float(value)


def _front(app_args: dict) -> dict:
    """The front door's app arguments, checked (see FRONT_DEFAULTS)."""
    front = {name: app_args.get(name, default) for name, default in FRONT_DEFAULTS.items()}
    front["grpc_port"] = _port(app_args, "grpc_port")
    for name in ("ssl_keyfile", "ssl_certfile"):
        path = front[name]
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{name} {path!r} is not a file")
    if bool(front["ssl_keyfile"]) != bool(front["ssl_certfile"]):
        raise ValueError("TLS needs both ssl_keyfile and ssl_certfile, got only "
                         + ("ssl_keyfile" if front["ssl_keyfile"] else "ssl_certfile"))
    for name in ("max_request_body_bytes", "max_prompts_per_request", "max_seqs_per_request"):
        front[name] = _positive_int(app_args, name, FRONT_DEFAULTS[name])
    if not isinstance(front["protect_health_metrics"], bool):
        raise ValueError("protect_health_metrics must be true or false, "
                         f"got {front['protect_health_metrics']!r}")
    auto_tool_parser(front["enable_auto_tool_choice"], front["tool_call_parser"])  # ValueError if bad
    check_reasoning_parser(front["reasoning_parser"])
    front["shutdown_timeout"] = _seconds(app_args, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_S,
                                         allow_minimum=True)
    return front


def with_reasoning_parser(engine_args: dict, parser: Optional[str]) -> dict:
    """The engine arguments with `parser` in their structured_outputs_config (as vLLM's
    --reasoning-parser sets it), so the cores start a grammar after the reasoning."""
    if parser is None:
        return engine_args
    config = dataclasses.asdict(parse_structured_outputs_config(engine_args.get("structured_outputs_config")))
    return dict(engine_args, structured_outputs_config=dict(config, reasoning_parser=check_reasoning_parser(parser)))


def build_app(args: Optional[dict] = None):
    """The application for `serve run`/`serve deploy` (`args` from the YAML) and `raylm serve`.

    `args`: engine arguments by their EngineArgs (vLLM) names, plus num_groups,
    served_model_name, api_key (or $RAYLM_API_KEY; HTTP and gRPC), max_n (the largest
    `n` allowed), max_queued_requests (waiting requests past which a request gets 429),
    api_server_count (ingress replicas) or autoscaling_config (Serve's, for the ingress),
    http_port (and http_host, default 127.0.0.1): every ingress replica also serves the
    OpenAI API itself on that port (SO_REUSEPORT), bypassing Serve's HTTP proxy;
    grpc_port: likewise the gRPC `Generate` service, on http_host; ssl_keyfile and
    ssl_certfile: TLS on both; max_request_body_bytes (413 past it; gRPC's largest
    message); protect_health_metrics (the key on /health and /metrics too);
    shutdown_timeout (how long a stopping replica lets requests finish);
    max_prompts_per_request and max_seqs_per_request (prompts x n); step_timeout (a group
    holding work with no step for that long is hung: restarted, its requests moved),
    queue_timeout (how long a request waits for a serving group before a 503),
    max_redispatches (how often one request may be moved); reasoning_parser (vLLM's
    --reasoning-parser: chat replies' reasoning apart, and grammars after it)."""
    args = dict(args or {})
    app_args = {k: args.pop(k) for k in APP_ARGS if k in args}
    unknown = sorted(set(args) - set(EngineArgs.field_names()))
    if unknown:
        raise ValueError(f"unknown raylm argument(s) {unknown}; known: engine arguments "
                         f"{EngineArgs.field_names()} and {list(APP_ARGS)}")
    args = with_reasoning_parser(args, app_args.get("reasoning_parser"))
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
    http_port = _port(app_args, "http_port")
    front = _front(app_args)
    step_timeout = _seconds(app_args, "step_timeout", DEFAULT_STEP_TIMEOUT_S)
    queue_timeout = _seconds(app_args, "queue_timeout", DEFAULT_QUEUE_TIMEOUT_S)
    max_redispatches = _positive_int(app_args, "max_redispatches", DEFAULT_MAX_REDISPATCHES, 0)
    # A stopping ingress drains for up to shutdown_timeout (then FLUSH_S); the router
    # keeps the cores until they are idle, a little longer at most; Serve's kill comes last.
    grace = front["shutdown_timeout"] + FLUSH_S + _SERVE_GRACE_MARGIN_S
    router = RouterDeployment.options(graceful_shutdown_timeout_s=grace + _SERVE_GRACE_MARGIN_S).bind(
        args, num_groups, served, max_queued, step_timeout, front["shutdown_timeout"] + FLUSH_S)
    ingress = Ingress.options(graceful_shutdown_timeout_s=grace, graceful_shutdown_wait_loop_s=0.1)
    ingress = (ingress.options(autoscaling_config=autoscaling) if autoscaling is not None
               else ingress.options(num_replicas=replicas))
    return ingress.bind(router, args, served, api_key, max_n, http_host, http_port,
                        queue_timeout, max_redispatches, front)
