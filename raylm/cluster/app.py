"""The Ray Serve application: an OpenAI/gRPC ingress in front of the global scheduler.

    Ingress (FastAPI via @serve.ingress, gRPC methods, handle methods; scales out)
      -> Scheduler (one replica: the GlobalScheduler, owning every request)
           -> worker groups (one Ray actor per TP rank, in a STRICT_PACK placement group)

`build_app(args)` is the `import_path` target of `deploy/serve.yaml` and of `raylm serve`.
Both deployments reserve a fraction of a CPU (Serve's default is a whole one), so the
ingress, the scheduler and two TP ranks fit on a 2-core machine.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, AsyncIterator, Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from raylm.cluster.backend import PromptType, final_output
from raylm.cluster.grpc_service import GrpcGenerateMixin
from raylm.cluster.multiplex import Demux, Mailbox, detached, next_item
from raylm.engine.config import EngineArgs
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams

logger = logging.getLogger("raylm")

APP_NAME = "raylm"
APP_ARGS = ("num_groups", "served_model_name", "api_key", "max_n")
# Concurrent requests a replica accepts (Serve's default of 5 would serialise a server).
MAX_ONGOING_REQUESTS = 4096
INGRESS_NUM_CPUS = 0.1
SCHEDULER_NUM_CPUS = 0.1


def _resolve_cluster_device(device: str) -> str:
    """The scheduler replica sees no GPU itself; 'auto' follows the cluster's resources."""
    if device != "auto":
        return device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def _unwrap(exc: BaseException) -> BaseException:
    """Errors raised in the scheduler replica arrive wrapped; surface a ValueError as is,
    so the fronts can answer 400 with its message."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ValueError):
        return ValueError(str(cause))
    return exc


@serve.deployment(name="Scheduler", ray_actor_options={"num_cpus": SCHEDULER_NUM_CPUS},
                  max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10)
class SchedulerDeployment:
    """Hosts the one GlobalScheduler of the application."""

    def __init__(self, engine_args: dict, num_groups: int = 1, served_model_name: Optional[str] = None):
        from raylm.cluster.global_scheduler import GlobalScheduler

        kwargs = dict(engine_args)
        kwargs["device"] = _resolve_cluster_device(kwargs.get("device", "auto"))
        kwargs["distributed_executor_backend"] = "ray"  # the model runs in worker actors
        self.scheduler = GlobalScheduler(EngineArgs(**kwargs), num_groups, served_model_name)
        self.mailboxes: dict[str, Mailbox] = {}

    # ---- the ingress's path: requests submitted, outputs multiplexed per subscriber ----
    def _mailbox(self, subscriber: str) -> Mailbox:
        box = self.mailboxes.get(subscriber)
        if box is None:
            box = self.mailboxes[subscriber] = Mailbox()
        return box

    async def submit(self, prompt: PromptType, params: SamplingParams, request_id: str,
                     subscriber: str) -> None:
        """Add a request; its outputs go to `subscriber`'s stream. ValueError on bad input."""
        box = self._mailbox(subscriber)
        self.scheduler.submit(prompt, params, request_id, box.put)
        box.live.add(request_id)

    async def subscribe(self, subscriber: str) -> AsyncIterator[list]:
        """The outputs of every request `subscriber` submitted, in batches (multiplex.py).
        If the subscriber goes away, its unfinished requests are aborted."""
        box = self._mailbox(subscriber)
        try:
            while True:
                yield await box.take()
        finally:
            for rid in list(box.live):
                await self.scheduler.abort(rid)
            self.mailboxes.pop(subscriber, None)

    # ---- one stream per request (Python handles calling this deployment directly) ----
    async def generate_stream(self, prompt: PromptType, params: SamplingParams,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        async for out in self.scheduler.generate_stream(prompt, params, request_id):
            yield out

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: Optional[str] = None) -> RequestOutput:
        return await self.scheduler.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.scheduler.abort(request_id)

    async def metrics_text(self) -> bytes:
        return await self.scheduler.metrics_text()

    async def check_health(self) -> None:
        await self.scheduler.check_health()

    def stats(self) -> dict:
        return self.scheduler.stats()

    def info(self) -> dict:
        return self.scheduler.info()


class HandleBackend:
    """The Backend protocol over the scheduler deployment's handle: requests are
    submitted one by one, their outputs arrive on one subscription stream (multiplex.py)."""

    def __init__(self, handle: DeploymentHandle, model_name: str, max_model_len: int,
                 tokenizer: Any, max_logprobs: int):
        self.handle = handle
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.demux = Demux(lambda sub: handle.options(stream=True).subscribe.remote(sub))

    async def generate_stream(self, prompt: PromptType, params: SamplingParams,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        rid = request_id or uuid.uuid4().hex
        queue = self.demux.open(rid)
        finished = False
        try:
            try:
                await self.handle.submit.remote(prompt, params, rid, self.demux.subscriber)
            except Exception as exc:
                finished = True  # not added (bad input) or the scheduler is gone
                raise _unwrap(exc) from None
            while not finished:
                out = await next_item(queue)
                if isinstance(out, BaseException):
                    finished = True  # the scheduler side has ended it
                    raise out
                finished = out.finished
                yield out
        finally:
            self.demux.close(rid)
            if not finished:  # client gone: stop the request now and free its blocks
                detached(self.abort(rid))

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: Optional[str] = None) -> RequestOutput:
        return await final_output(self.generate_stream(prompt, params, request_id))

    async def abort(self, request_id: str) -> None:
        await self.handle.abort.remote(request_id)

    async def metrics_text(self) -> bytes:
        return await self.handle.metrics_text.remote()

    async def check_health(self) -> None:
        try:
            await self.handle.check_health.remote()
        except Exception as exc:
            raise RuntimeError(str(_unwrap(exc))) from None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
                  max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress()
class Ingress(GrpcGenerateMixin):
    """HTTP (OpenAI API), gRPC (`Generate` service) and Python-handle entry points."""

    def __init__(self, scheduler: DeploymentHandle, engine_args: dict,
                 served_model_name: Optional[str] = None, api_key: Optional[str] = None,
                 max_n: int = 16):
        from transformers import AutoTokenizer

        from raylm.cluster.global_scheduler import DEFAULT_SERVED_NAME
        from raylm.engine.config import resolve_max_model_len
        from raylm.workers.loader import load_config, resolve_model_path

        args = EngineArgs(**engine_args)
        model_dir = resolve_model_path(args.model)
        max_model_len = resolve_max_model_len(args, load_config(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
        name = served_model_name or args.model or DEFAULT_SERVED_NAME
        self.backend = HandleBackend(scheduler, name, max_model_len, tokenizer, args.max_logprobs)
        self.api_key = api_key
        self.max_n = max_n

    def __del__(self):
        """Serve calls this at shutdown: end the subscription stream."""
        backend = getattr(self, "backend", None)  # None if __init__ failed
        if backend is not None:
            backend.demux.shutdown()

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


def build_app(args: Optional[dict] = None):
    """The application for `serve run`/`serve deploy` (`args` from the YAML) and `raylm serve`.

    `args`: engine arguments by their EngineArgs (vLLM) names, plus num_groups,
    served_model_name, api_key (or $RAYLM_API_KEY) and max_n (the largest `n` allowed)."""
    args = dict(args or {})
    app_args = {k: args.pop(k) for k in APP_ARGS if k in args}
    unknown = sorted(set(args) - set(EngineArgs.field_names()))
    if unknown:
        raise ValueError(f"unknown raylm argument(s) {unknown}; known: engine arguments "
                         f"{EngineArgs.field_names()} and {list(APP_ARGS)}")
    EngineArgs(**args)  # bad values fail here, before anything is deployed
    num_groups = int(app_args.get("num_groups", 1))
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    max_n = int(app_args.get("max_n", 16))
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    served = app_args.get("served_model_name")
    api_key = app_args.get("api_key") or os.environ.get("RAYLM_API_KEY") or None
    scheduler = SchedulerDeployment.bind(args, num_groups, served)
    return Ingress.bind(scheduler, args, served, api_key, max_n)
