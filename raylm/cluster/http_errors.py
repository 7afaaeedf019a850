"""Errors of the HTTP API, in OpenAI's shape, and what the server log says about them.

Every 4xx and 5xx is `{"error": {"message", "type", "param", "code"}}` (see
`protocol.error_body`): FastAPI's 422 becomes a 400 naming the field, its 404/405 say
so in that shape. A 5xx says what the client can act on and nothing of the server's
insides (no traceback, pid, address or actor id): the details go to the server log under
an error id that the message quotes. `RejectionLog` writes one line per refused request
(method, path, status, message) and no traceback for a client's error.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from raylm.cluster.protocol import ApiError, error_body

logger = logging.getLogger("raylm")

# How much of an error body RejectionLog keeps for its line.
_LOGGED_BODY_BYTES = 4096
# The ASGI scope key by which an inner RejectionLog knows an outer one logs.
_LOGGED_OUTSIDE = "raylm.rejection_log"


def error_response(status: int, message: str, param: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def internal_error_message(exc: BaseException, where: str) -> str:
    """Log `exc` with its traceback under a new error id; the client's message quotes the
    id and nothing of the exception."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s in %s", error_id, where, exc_info=exc)
    return (f"the server failed to handle this request (error id {error_id}); retry it, and "
            "report the error id if it keeps failing")


def is_client_error(exc: BaseException) -> bool:
    """Whether `exc` is a refusal of the client's input (our ValueErrors name the field),
    not a failure inside the server. Ray's wrapped remote errors subclass the remote
    exception's type (RayTaskError(ValueError)) but carry a traceback: internal."""
    return isinstance(exc, ValueError) and not type(exc).__module__.startswith("ray")


# ---- FastAPI's exception handlers ------------------------------------------------------
def _is_branch(part) -> bool:
    """Whether a pydantic error location part names a union branch ("str", "list[int]")
    rather than a field."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or
                                      part in ("str", "int", "float", "bool", "dict", "list"))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes a 400 that names the field, as vLLM answers."""
    errors = exc.errors() or [{"type": "", "loc": (), "msg": "invalid request"}]
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first["msg"])
        return error_response(400, f"malformed JSON body: {detail}")
    if not loc or isinstance(loc[0], int):
        return error_response(400, f"the request body must be a JSON object: {first['msg']}")
    field = str(loc[0])
    # A union field (prompt, stop, content) fails once per branch: name the branches.
    branches = list(dict.fromkeys(e["loc"][2] for e in errors
                                  if len(e["loc"]) > 2 and e["loc"][1] == field and _is_branch(e["loc"][2])))
    body = exc.body if isinstance(exc.body, dict) else {}
    if len(branches) > 1 and field in body:
        message = f"{field} must be one of {', '.join(branches)}"
        value = body[field]
    else:
        path = ".".join(str(p) for p in loc if not _is_branch(p))
        message, value = f"{path}: {first['msg']}", first.get("input")
    if first["type"] != "missing":
        got = repr(value)
        message += f", got {got if len(got) <= 80 else got[:77] + '...'}"
    return error_response(400, message, field)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404 for a route we do not serve, 405) in OpenAI's shape."""
    if exc.status_code == 404 and exc.detail == "Not Found":  # as OpenAI says it
        return error_response(404, f"Invalid URL ({request.method} {request.url.path})")
    if exc.status_code == 405:
        return error_response(405, f"Method Not Allowed ({request.method} {request.url.path})",
                              headers=exc.headers)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


def add_error_handlers(app) -> None:
    """OpenAI's error shape for FastAPI's own errors and any ApiError a route raises;
    `RejectionLog` around the routes (it also answers an unhandled exception)."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ApiError, api_error)
    app.add_middleware(RejectionLog)


def param_of(message: str, fields, renames: dict) -> Optional[str]:
    """The request field a ValueError message starts with ("top_p must be ..."), if any."""
    m = re.match(r"`?([A-Za-z_]+)", message)
    name = renames.get(m.group(1), m.group(1)) if m else None
    return name if name in fields else None


# ---- one log line per refused request -------------------------------------------------
class RejectionLog:
    """ASGI middleware: one log line (method, path, status, message) for each response
    of status >= 400, without traceback (a warning for 4xx, an error for 5xx). An
    exception that escapes the routes is logged with its traceback under an error id and
    answered with a 500 in OpenAI's shape, never re-raised into the server's own log.

    Nested (the front door's around the app's own), only the outermost writes the line,
    so a request refused anywhere (a 401 or 413 at the front door, a 400 in a route) is
    logged once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        outer = scope.get(_LOGGED_OUTSIDE, False)  # an outer RejectionLog writes the line
        scope[_LOGGED_OUTSIDE] = True
        state = {"status": 0, "body": b""}

        async def watch(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and state["status"] >= 400:
                state["body"] = (state["body"] + message.get("body", b""))[:_LOGGED_BODY_BYTES]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if state["status"]:  # the response has started: nothing more can be sent
                internal_error_message(exc, f"{scope['method']} {scope['path']} (response started)")
                return
            message = internal_error_message(exc, f"{scope['method']} {scope['path']}")
            await error_response(500, message)(scope, receive, watch)
        if state["status"] >= 400 and not outer:
            _log_rejection(scope, state["status"], state["body"])


def _log_rejection(scope, status: int, body: bytes) -> None:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    log = logger.error if status >= 500 else logger.warning
    log("%s %s -> %d: %s", scope["method"], scope["path"], status, message)
