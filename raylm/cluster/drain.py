"""Shutting an ingress replica down without dropping a request.

`Drain.run` (called when Serve stops the replica): stop admitting (new HTTP requests get
503, new gRPC calls UNAVAILABLE), let the requests in flight finish for up to
`shutdown_timeout` seconds, then end the rest: each is aborted, so its stream gets a last
chunk with finish_reason "abort", and an SSE stream also gets an error event before
`data: [DONE]`; a request that never reached the engine gets 503. No stream is cut off
mid-body.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable

from raylm.cluster.limits import send_error
from raylm.cluster.protocol import error_body

logger = logging.getLogger("raylm")

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# After the forced aborts, how long the ended streams get to write their last events.
FLUSH_S = 5.0
_POLL_S = 0.05
_DONE = b"data: [DONE]\n\n"


class _Answer:
    """One HTTP request being answered: whether its response has started, whether the
    drain cut it."""

    __slots__ = ("started", "cut")

    def __init__(self):
        self.started = self.cut = False


class Drain:
    """The shutdown state of one ingress replica, and its ASGI middleware (`wrap`)."""

    def __init__(self, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S):
        self.shutdown_timeout = shutdown_timeout
        self.draining = False  # refusing new requests
        self.forced = False  # the timeout passed: what was left was aborted
        self._answers: dict[asyncio.Task, _Answer] = {}

    @property
    def active_http(self) -> int:
        """HTTP requests being answered."""
        return len(self._answers)

    def refusal(self) -> str:
        return "the server is shutting down; retry on another replica"

    def wrap(self, app):
        """`app` behind the drain: 503 while draining; an SSE stream ended by the
        shutdown gets an error event before its `data: [DONE]`."""

        async def drained(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            if self.draining:
                return await send_error(send, 503, self.refusal(), [(b"retry-after", b"1")])
            answer = _Answer()
            work = asyncio.ensure_future(app(scope, receive, self._marking(send, answer)))
            self._answers[work] = answer
            try:
                await work
            except asyncio.CancelledError:
                if not answer.cut:
                    raise
                await send_error(send, 503, self.refusal(), [(b"retry-after", b"1")])
            finally:
                del self._answers[work]

        return drained

    def _marking(self, send, answer: _Answer):
        async def marked(message):
            answer.started = True
            body = message.get("body", b"")
            if self.forced and message["type"] == "http.response.body" and body.endswith(_DONE):
                event = error_body(503, f"the server shut down: the request was still running "
                                        f"after shutdown_timeout ({self.shutdown_timeout:g} s)")
                message = dict(message, body=body[:-len(_DONE)] +
                               f"data: {json.dumps(event)}\n\n".encode() + _DONE)
            await send(message)

        return marked

    async def run(self, open_request_ids: Callable[[], list],
                  abort: Callable[[str], Awaitable[None]]) -> None:
        """Drain: refuse new requests; wait up to shutdown_timeout for the requests open
        in the backend and the responses being written; abort what is left; answer 503
        to requests that never reached the engine (in Serve, one that arrived as the
        router stopped would wait for it forever); give the rest FLUSH_S to end."""
        self.draining = True
        deadline = time.monotonic() + self.shutdown_timeout
        while (open_request_ids() or any(a.started for a in self._answers.values())) \
                and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        left = open_request_ids()
        if left:
            logger.warning("shutdown: aborting %d request(s) still running after %g s",
                           len(left), self.shutdown_timeout)
            self.forced = True
            for rid in left:
                await abort(rid)
        deadline = time.monotonic() + FLUSH_S
        while open_request_ids() and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        for work, answer in list(self._answers.items()):
            if not answer.started:
                answer.cut = True
                work.cancel()
        while self._answers and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
