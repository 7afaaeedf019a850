"""The ingress side of the cluster: text in, text out, token ids to and from the cores.

`Frontend` implements the `Backend` protocol that the HTTP and gRPC fronts and the
Python handle use. Per request it validates and tokenizes, asks the router for a group
(one message), sends the request to that group's engine core, and turns the core's
token-id deltas into cumulative `RequestOutput`s (detokenizing, stop strings: a match
aborts the core request). It subscribes once to each core's output stream, so a step of
a core costs one message per ingress replica, whatever the number of requests. When a
request ends it tells the router (batched).

    Frontend ──assign/release──> Router (ledger, routing, admission)
        │ add_requests / abort          ▲ snapshots (stats, prefix hashes)
        ▼                               │
    engine core (one per group) ──one batch of token-id deltas per step──> Frontend
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol

from raylm.cluster.backend import PromptType, final_output
from raylm.engine.core import EngineCoreOutput, EngineCoreRequest
from raylm.engine.input_processor import InputProcessor
from raylm.cluster.router import NoGroupAvailable
from raylm.engine.output_processor import GroupFailure, OutputProcessor
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.engine.structured_outputs import GrammarConfig
from raylm.scheduler.block_manager import prefix_block_hashes

logger = logging.getLogger("raylm")

# Ended requests are reported to the router in batches, at most this late.
RELEASE_DELAY_S = 0.01
# A request waits this long for a serving group before a 503 (vLLM has no such knob).
DEFAULT_QUEUE_TIMEOUT_S = 60.0
# A request whose group fails is moved at most this many times.
DEFAULT_MAX_REDISPATCHES = 2


def detached(coro) -> asyncio.Task:
    """Run coro as a task outside the current request's context. Serve cancels the
    calls a request makes when that request is cancelled (a client disconnect); the
    shared subscriptions, aborts and re-dispatches must outlive it."""
    loop = asyncio.get_running_loop()
    return contextvars.Context().run(loop.create_task, coro)  # the task copies this empty context


class CoreClient(Protocol):
    """One engine core as the frontend sees it."""

    async def add(self, requests: list[EngineCoreRequest]) -> None: ...

    def abort(self, request_ids: list[str], reason: str = "abort") -> None: ...

    def subscribe(self, subscriber: str, on_batch, on_error) -> None:
        """Call on_batch(list[EngineCoreOutput]) for each step's outputs of
        `subscriber`'s requests; on_error(exc) once if the stream breaks."""

    def unsubscribe(self, subscriber: str) -> None: ...


class RouterClient(Protocol):
    async def assign(self, request_id: str, hashes: list[int], num_seqs: int,
                     redispatch: bool = False, failed_group: Optional[tuple[int, int]] = None
                     ) -> tuple[int, int]:
        """(group, its core's generation); failed_group: (group, generation) seen to die."""

    async def health(self) -> dict: ...

    def release(self, request_ids: list[str]) -> None: ...

    async def metrics_text(self) -> bytes: ...

    async def check_health(self) -> None: ...


async def next_item(queue: asyncio.Queue) -> Any:
    """The newest of the queued cumulative outputs (waiting for one); a finished output
    or an error ends the coalescing, so neither is ever skipped."""
    item = await queue.get()
    while not isinstance(item, BaseException) and not item.finished and not queue.empty():
        item = queue.get_nowait()
    return item


@dataclass(eq=False)
class _Open:
    """A request this frontend streams."""

    group: int
    queue: asyncio.Queue
    hashes: list
    generation: int = 0  # of the group's core it was sent to
    redispatches: int = 0
    moving: bool = False  # being re-dispatched


class Frontend:
    """Backend over a router and the engine cores (see module doc).

    When a core fails (its stream breaks, or it reports its group failed), each request
    it held is re-dispatched to a serving group as prompt + tokens so far; the client's
    stream goes on (`OutputProcessor.redispatch`). With no group serving, a request
    waits up to `queue_timeout` seconds for one, then fails with NoGroupAvailable (503);
    one that has been re-dispatched `max_redispatches` times and fails again gets an
    error. `default_sampling` is what the fronts use for the sampling fields a request
    leaves out (`ModelConfig.default_sampling`); `grammar_config` what the fronts check a
    request's output constraint with (the cores' `structured_outputs_config`, parsed)."""

    def __init__(self, router: RouterClient, cores: list[CoreClient], tokenizer, model_name: str,
                 max_model_len: int, vocab_size: int, max_logprobs: int, block_size: int,
                 enable_prefix_caching: bool, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
                 max_redispatches: int = DEFAULT_MAX_REDISPATCHES, default_sampling: Optional[dict] = None,
                 grammar_config: Optional[GrammarConfig] = None):
        self.router = router
        self.core_clients = cores
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.queue_timeout = queue_timeout
        self.max_redispatches = max_redispatches
        # The model's sampling defaults (ModelConfig.default_sampling): the HTTP and gRPC
        # fronts fill in the fields a request leaves out.
        self.default_sampling = dict(default_sampling or {})
        self.grammar_config = grammar_config or GrammarConfig()
        self.inputs = InputProcessor(tokenizer, max_model_len, vocab_size, max_logprobs)
        self.outputs = OutputProcessor(tokenizer, max_model_len)
        self.subscriber = uuid.uuid4().hex
        self._open: dict[str, _Open] = {}
        self._generations: dict[int, int] = {}  # the core generation each client talks to
        self._refreshing: dict[int, asyncio.Future] = {}  # groups whose client is being replaced
        self._subscribed = False
        self._to_release: list[str] = []
        self._release_handle = None

    # ---- subscriptions -------------------------------------------------------------
    async def _ensure_started(self) -> None:
        """Before the first request: subscribe to every core's outputs."""
        self._ensure_subscribed()

    def _ensure_subscribed(self) -> None:
        if self._subscribed:
            return
        self._subscribed = True
        for gi in range(len(self.core_clients)):
            self._subscribe_core(gi)

    def _subscribe_core(self, gi: int) -> None:
        client = self.core_clients[gi]
        gen = getattr(client, "generation", 0)  # failures it reports are that core's
        client.subscribe(self.subscriber,
                         lambda batch, gi=gi, gen=gen: self._on_batch(gi, gen, batch),
                         lambda exc, gi=gi, gen=gen: self._on_error(gi, gen, exc))

    async def _use_generation(self, gi: int, generation: int) -> None:
        """The router names group gi's core generation: after a restart, switch to the
        new core (subclasses fetch its handle first). Concurrent callers wait for one
        switch: none may send to the old core meanwhile."""
        while gi in self._refreshing:
            await asyncio.shield(self._refreshing[gi])
        if generation <= self._generations.setdefault(gi, generation):
            return
        done = self._refreshing[gi] = asyncio.get_running_loop().create_future()
        try:
            await self._refresh_core(gi)
            self._generations[gi] = generation
        finally:
            del self._refreshing[gi]
            done.set_result(None)

    async def _refresh_core(self, gi: int) -> None:
        self._subscribe_core(gi)

    def _on_batch(self, gi: int, gen: int, batch: list[EngineCoreOutput]) -> None:
        results, stops = self.outputs.process(batch)
        if stops:
            self.core_clients[gi].abort(stops, "stop")
        for rid, item in results:
            entry = self._open.get(rid)
            if entry is None:
                continue
            if isinstance(item, GroupFailure):
                self._start_redispatch(rid, gi, gen, str(item))
            else:
                entry.queue.put_nowait(item)

    def _on_error(self, gi: int, gen: int, exc: BaseException) -> None:
        """Core gi's stream broke (the process is gone): move its open requests."""
        for rid in list(self._open):
            self._start_redispatch(rid, gi, gen, f"worker group {gi} failed: {type(exc).__name__}")

    def unsubscribe_all(self) -> None:
        if self._subscribed:
            for core in self.core_clients:
                core.unsubscribe(self.subscriber)
            self._subscribed = False

    # ---- re-dispatch ---------------------------------------------------------------
    def _start_redispatch(self, rid: str, gi: int, gen: int, reason: str) -> None:
        """Move a request off core (gi, gen), unless it is no longer there."""
        entry = self._open.get(rid)
        if entry is None or entry.moving or entry.group != gi or entry.generation != gen:
            return
        entry.moving = True
        detached(self._redispatch(rid, entry, reason, (gi, gen)))

    async def _redispatch(self, rid: str, entry: _Open, reason: str, failed: tuple) -> None:
        try:
            while True:
                entry.redispatches += 1
                if entry.redispatches > self.max_redispatches:
                    raise RuntimeError(f"request {rid} failed in {entry.redispatches} worker groups "
                                       f"(max_redispatches is {self.max_redispatches}); last: {reason}")
                logger.warning("re-dispatching request %s (%s)", rid, reason)
                reqs = self.outputs.redispatch(rid, entry.redispatches)
                if not reqs:  # nothing left to generate: its last output ends it
                    state = self.outputs.requests.pop(rid, None)
                    if state is not None:
                        entry.queue.put_nowait(state.to_output())
                    return
                for r in reqs:
                    r.subscriber = self.subscriber
                gi = await self._assign(rid, entry.hashes, len(reqs), redispatch=True, failed_group=failed)
                entry.group, entry.generation = gi, self._generations[gi]
                try:
                    await self.core_clients[gi].add(reqs)
                    return
                except ValueError:
                    raise
                except Exception as exc:  # that core died too: try the next
                    reason = f"worker group {gi} failed: {type(exc).__name__}"
                    failed = (gi, entry.generation)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.outputs.fail(rid)
            entry.queue.put_nowait(exc)
        finally:
            entry.moving = False

    async def _assign(self, rid: str, hashes: list, num_seqs: int, redispatch: bool = False,
                      failed_group: Optional[tuple[int, int]] = None) -> int:
        """The router's group for a request, waiting up to queue_timeout for one to serve."""
        deadline = time.monotonic() + self.queue_timeout
        delay = 0.05
        while True:
            try:
                gi, generation = await self.router.assign(rid, hashes, num_seqs, redispatch, failed_group)
                failed_group = None
                try:
                    await self._use_generation(gi, generation)
                except asyncio.CancelledError:
                    if not redispatch:  # the caller left before it held the request: free its place
                        self._release(rid)
                    raise
                return gi
            except NoGroupAvailable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(delay, left))
                delay = min(1.0, 2 * delay)

    # ---- the router ----------------------------------------------------------------
    def _release(self, request_id: str) -> None:
        self._to_release.append(request_id)
        if self._release_handle is None:
            self._release_handle = asyncio.get_running_loop().call_later(RELEASE_DELAY_S, self._flush)

    def _flush(self) -> None:
        self._release_handle = None
        batch, self._to_release = self._to_release, []
        if batch:
            self.router.release(batch)

    @property
    def open_request_ids(self) -> list[str]:
        """Requests this frontend is streaming now."""
        return list(self._open)

    # ---- the Backend protocol ------------------------------------------------------
    async def generate_stream(self, prompt: PromptType, params: SamplingParams,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as the request progresses; the last has finished=True.
        Bad input raises ValueError before anything is yielded; a full queue raises
        `Overloaded`, no serving group within queue_timeout `NoGroupAvailable`. Closing
        the iterator early aborts the request and frees its blocks."""
        rid = request_id or uuid.uuid4().hex
        if rid in self._open:
            raise ValueError(f"request_id {rid!r} is already in use")
        text, ids = await self.inputs.validate_async(prompt, params)  # long texts off the loop
        hashes = prefix_block_hashes(ids, self.block_size) if self.enable_prefix_caching else []
        await self._ensure_started()
        gi = await self._assign(rid, hashes, params.n)
        entry = self._open[rid] = _Open(gi, asyncio.Queue(), hashes, self._generations[gi])
        finished = False
        try:
            reqs = self.outputs.add_request(rid, text, ids, params, subscriber=self.subscriber)
            try:
                await self.core_clients[gi].add(reqs)
            except (ValueError, asyncio.CancelledError):
                finished = True
                self.outputs.fail(rid)
                raise
            except Exception as exc:  # the core is gone: move the request
                self._start_redispatch(rid, gi, entry.generation, f"worker group {gi} failed: {type(exc).__name__}")
            while True:
                item = await next_item(entry.queue)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._open.pop(rid, None)
            if not finished:  # client gone: stop the request now and free its blocks
                _, running = self.outputs.abort(rid)
                if running:
                    self.core_clients[entry.group].abort(running)
            self._release(rid)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: Optional[str] = None) -> RequestOutput:
        return await final_output(self.generate_stream(prompt, params, request_id))

    async def abort(self, request_id: str) -> None:
        entry = self._open.get(request_id)
        if entry is None:
            return
        out, running = self.outputs.abort(request_id)
        if running:
            self.core_clients[entry.group].abort(running)
        if out is not None:
            entry.queue.put_nowait(out)

    async def metrics_text(self) -> bytes:
        return await self.router.metrics_text()

    async def check_health(self) -> None:
        await self.router.check_health()

    async def health(self) -> dict:
        """{"status", "groups": [{"id", "state", "last_step_age_s"}]} (see Router.health)."""
        return await self.router.health()
