"""ASGI middleware at the HTTP front door, outside the OpenAI app: the API key and the
request body limit. Both answer before the body is parsed, so a client without the key,
or with a body too large, costs the event loop almost nothing.

    app = front_door(create_openai_app(backend), api_key="s3cret", max_request_body_bytes=16 << 20)

Every refusal is OpenAI's error JSON (`protocol.error_body`) and one log line
(`http_errors.RejectionLog`, outermost). `ApiKeyAuth` is the one API-key check of HTTP:
`create_openai_app(api_key=...)` uses it too.
"""
from __future__ import annotations

import json
import secrets
from typing import Optional

from raylm.cluster.http_errors import RejectionLog
from raylm.cluster.protocol import error_body

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20
# Open without the key unless protect_health_metrics (vLLM leaves them open too).
OPEN_PATHS = frozenset({"/health", "/metrics"})


async def send_error(send, status: int, message: str, headers: Optional[list] = None) -> None:
    """A whole OpenAI error response; `Connection: close` so no unread body is reused."""
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def _path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def has_api_key(authorization, api_key: str) -> bool:
    """Whether an `Authorization` header (or gRPC metadata) value, bytes or str, is
    `Bearer <api_key>`; compared in constant time."""
    given = authorization.encode() if isinstance(authorization, str) else (authorization or b"")
    return secrets.compare_digest(given, f"Bearer {api_key}".encode())


class ApiKeyAuth:
    """Every route needs `Authorization: Bearer <api_key>` (401 otherwise) except
    /health and /metrics, which need it too with protect_health_metrics. Checked
    before the body is read."""

    def __init__(self, app, api_key: str, protect_health_metrics: bool = False):
        self.app = app
        self.api_key = api_key
        self.open = frozenset() if protect_health_metrics else OPEN_PATHS

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _path(scope) not in self.open:
            if not has_api_key(dict(scope["headers"]).get(b"authorization", b""), self.api_key):
                return await send_error(send, 401, "invalid or missing API key: send "
                                        "'Authorization: Bearer <key>'")
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, while it is read: at once when
    Content-Length says so, else as soon as the chunks received pass it. The body is
    read here in full (at most `limit` bytes) before the app sees it, so no handler
    starts parsing a body that is still arriving."""

    def __init__(self, app, limit: int = DEFAULT_MAX_REQUEST_BODY_BYTES):
        self.app = app
        self.limit = limit

    def _too_large(self, declared: Optional[int] = None) -> str:
        size = f" (Content-Length {declared})" if declared is not None else ""
        return (f"request body is larger than max_request_body_bytes ({self.limit} bytes)"
                f"{size}; see raylm serve --max-request-body-bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, 413, self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await send_error(send, 413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the buffered body once, then the client's messages
    (the disconnect a streaming handler waits for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def front_door(app, api_key: Optional[str] = None, protect_health_metrics: bool = False,
               max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES, drain=None):
    """`app` behind, from the outside in: the rejection log (one line per refused
    request), the drain (a `drain.Drain`, when given), the key check (when api_key is
    set), the body limit."""
    app = BodyLimit(app, max_request_body_bytes)
    if api_key:
        app = ApiKeyAuth(app, api_key, protect_health_metrics)
    if drain is not None:
        app = drain.wrap(app)
    return RejectionLog(app)
