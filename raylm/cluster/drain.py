"""Shutting an ingress replica down without dropping a request.

`Drain.run` (called when Serve stops the replica): stop admitting (new HTTP requests get
503, new gRPC calls UNAVAILABLE), let the requests in flight finish for up to
`shutdown_timeout` seconds, then end the rest: each is aborted, so its stream gets a last
chunk with finish_reason "abort", and an SSE stream also gets an error event before
`data: [DONE]`. No stream is cut off mid-body.
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


class Drain:
    """The shutdown state of one ingress replica, and its ASGI middleware (`wrap`)."""

    def __init__(self, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S):
        self.shutdown_timeout = shutdown_timeout
        self.draining = False  # refusing new requests
        self.forced = False  # the timeout passed: what is left was aborted
        self.active_http = 0  # HTTP requests being answered

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
            self.active_http += 1
            try:
                await app(scope, receive, self._marking(send))
            finally:
                self.active_http -= 1

        return drained

    def _marking(self, send):
        async def marked(message):
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
        """Drain: refuse new requests, wait for those open (and HTTP answers being
        written) up to shutdown_timeout, abort the rest, give them FLUSH_S to end."""
        self.draining = True
        deadline = time.monotonic() + self.shutdown_timeout
        while (open_request_ids() or self.active_http) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        left = open_request_ids()
        if left:
            logger.warning("shutdown: aborting %d request(s) still running after %g s",
                           len(left), self.shutdown_timeout)
            self.forced = True
            for rid in left:
                await abort(rid)
        deadline = time.monotonic() + FLUSH_S
        while self.active_http and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
