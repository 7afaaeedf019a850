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
import logging
import uuid
from typing import Any, AsyncIterator, Optional, Protocol

from raylm.cluster.backend import PromptType, final_output
from raylm.engine.core import EngineCoreOutput, EngineCoreRequest
from raylm.engine.input_processor import InputProcessor
from raylm.engine.output_processor import OutputProcessor
from raylm.engine.outputs import RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.scheduler.block_manager import prefix_block_hashes

logger = logging.getLogger("raylm")

# Ended requests are reported to the router in batches, at most this late.
RELEASE_DELAY_S = 0.01


class CoreClient(Protocol):
    """One engine core as the frontend sees it."""

    async def add(self, requests: list[EngineCoreRequest]) -> None: ...

    def abort(self, request_ids: list[str], reason: str = "abort") -> None: ...

    def subscribe(self, subscriber: str, on_batch, on_error) -> None:
        """Call on_batch(list[EngineCoreOutput]) for each step's outputs of
        `subscriber`'s requests; on_error(exc) once if the stream breaks."""

    def unsubscribe(self, subscriber: str) -> None: ...


class RouterClient(Protocol):
    async def assign(self, request_id: str, hashes: list[int], num_seqs: int) -> int: ...

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


class Frontend:
    """Backend over a router and the engine cores (see module doc)."""

    def __init__(self, router: RouterClient, cores: list[CoreClient], tokenizer, model_name: str,
                 max_model_len: int, vocab_size: int, max_logprobs: int, block_size: int,
                 enable_prefix_caching: bool):
        self.router = router
        self.core_clients = cores
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.inputs = InputProcessor(tokenizer, max_model_len, vocab_size, max_logprobs)
        self.outputs = OutputProcessor(tokenizer, max_model_len)
        self.subscriber = uuid.uuid4().hex
        self._queues: dict[str, tuple[int, asyncio.Queue]] = {}
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
        for gi, core in enumerate(self.core_clients):
            core.subscribe(self.subscriber,
                           lambda batch, gi=gi: self._on_batch(gi, batch),
                           lambda exc, gi=gi: self._on_error(gi, exc))

    def _on_batch(self, gi: int, batch: list[EngineCoreOutput]) -> None:
        results, stops = self.outputs.process(batch)
        if stops:
            self.core_clients[gi].abort(stops, "stop")
        for rid, item in results:
            entry = self._queues.get(rid)
            if entry is not None:
                entry[1].put_nowait(item)

    def _on_error(self, gi: int, exc: BaseException) -> None:
        """Core gi's stream broke: fail its open requests."""
        error = RuntimeError(f"worker group {gi} failed: {exc}")
        for rid, (g, queue) in list(self._queues.items()):
            if g == gi:
                self.outputs.fail(rid)
                queue.put_nowait(error)

    def unsubscribe_all(self) -> None:
        if self._subscribed:
            for core in self.core_clients:
                core.unsubscribe(self.subscriber)
            self._subscribed = False

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
        return list(self._queues)

    # ---- the Backend protocol ------------------------------------------------------
    async def generate_stream(self, prompt: PromptType, params: SamplingParams,
                              request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as the request progresses; the last has finished=True.
        Bad input raises ValueError before anything is yielded; a full queue raises
        `Overloaded`. Closing the iterator early aborts the request and frees its blocks."""
        rid = request_id or uuid.uuid4().hex
        if rid in self._queues:
            raise ValueError(f"request_id {rid!r} is already in use")
        text, ids = self.inputs.validate(prompt, params)
        hashes = prefix_block_hashes(ids, self.block_size) if self.enable_prefix_caching else []
        await self._ensure_started()
        gi = await self.router.assign(rid, hashes, params.n)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = (gi, queue)
        finished = False
        try:
            reqs = self.outputs.add_request(rid, text, ids, params, subscriber=self.subscriber)
            try:
                await self.core_clients[gi].add(reqs)
            except BaseException:
                finished = True
                self.outputs.fail(rid)
                raise
            while True:
                item = await next_item(queue)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:  # client gone: stop the request now and free its blocks
                _, running = self.outputs.abort(rid)
                if running:
                    self.core_clients[gi].abort(running)
            self._release(rid)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: Optional[str] = None) -> RequestOutput:
        return await final_output(self.generate_stream(prompt, params, request_id))

    async def abort(self, request_id: str) -> None:
        entry = self._queues.get(request_id)
        if entry is None:
            return
        out, running = self.outputs.abort(request_id)
        if running:
            self.core_clients[entry[0]].abort(running)
        if out is not None:
            entry[1].put_nowait(out)

    async def metrics_text(self) -> bytes:
        return await self.router.metrics_text()

    async def check_health(self) -> None:
        await self.router.check_health()
