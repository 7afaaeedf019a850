"""The OpenAI-compatible HTTP API (vLLM's routes and fields) as a FastAPI app over a `Backend`.

    POST /v1/completions, POST /v1/chat/completions   (JSON, or SSE with stream=true)
    GET  /v1/models, /health, /metrics, /version
    POST /tokenize, /detokenize                        (vLLM's, behind the API key too)

Prompts are tokenized here (chat templates too), so length limits are checked before
the backend sees a request; the backend gets {"prompt": text, "prompt_token_ids": ids}.
Every error is OpenAI's error JSON. A client that goes away, streaming or not, closes
its backend streams, which aborts the requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from raylm.cluster.http_errors import (add_error_handlers, error_response, internal_error_message,
                                       is_client_error, param_of)
from raylm.cluster.limits import ApiKeyAuth
from raylm.cluster.reasoning import check_reasoning_parser, starts_inside
from raylm.cluster.protocol import ApiError, ChatCompletionRequest, CompletionRequest, check_text, error_body
from raylm.cluster.router import RETRY_AFTER_S, NoGroupAvailable, Overloaded
from raylm.cluster.responses import (ChatStream, CompletionStream, PromptInput, chat_response,
                                     completion_response, response_head)
from raylm.cluster.streams import Streams as _Streams
from raylm.cluster.structured_request import structured_outputs_of
from raylm.cluster.tokenize_routes import add_tokenize_routes, render_chat
from raylm.cluster.tool_calls import forced_tool_outputs, tool_mode
from raylm.cluster.tool_parsers import auto_tool_parser
from raylm.engine.input_processor import off_loop, text_size
from raylm.engine.outputs import RequestOutput
from raylm.engine.structured_outputs import DEFAULT_CONFIG

logger = logging.getLogger("raylm")

_DONE = "data: [DONE]\n\n"


# Per-request caps on the work one request creates. A vLLM user batches tens to a few
# hundred prompts per completions call; 1024 prompts, or 4096 sequences (prompts x n,
# e.g. 256 prompts x n=16), is well past that and still a bounded share of a server
# (2,000 prompts x n=16 starved a concurrent small chat for 46 s).
DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024
DEFAULT_MAX_SEQS_PER_REQUEST = 4096


def create_openai_app(backend, api_key: Optional[str] = None, max_n: int = 16,
                      enable_auto_tool_choice: bool = False, tool_call_parser: Optional[str] = None,
                      max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
                      max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST,
                      reasoning_parser: Optional[str] = None) -> FastAPI:
    """The OpenAI API over `backend` (see `raylm.cluster.backend.Backend`). With `api_key`,
    every route but /health and /metrics needs `Authorization: Bearer <api_key>`
    (`limits.ApiKeyAuth`, the front door's check; behind `limits.front_door` pass the key
    there instead);
    `max_n` caps `n`, `max_prompts_per_request` the prompts of one completions request,
    `max_seqs_per_request` its prompts x n. `tool_choice: "auto"` needs
    `enable_auto_tool_choice` and a `tool_call_parser` (vLLM's flags; see
    `tool_parsers.TOOL_PARSERS`). `reasoning_parser` (vLLM's `--reasoning-parser`) splits
    chat outputs into reasoning and content (see `raylm.cluster.reasoning`)."""
    from raylm import __version__

    auto_parser = auto_tool_parser(enable_auto_tool_choice, tool_call_parser)
    app = FastAPI(title="raylm", version=__version__)
    server = _OpenAIServer(backend, max_n, auto_parser, max_prompts_per_request, max_seqs_per_request,
                           check_reasoning_parser(reasoning_parser))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, server.completions(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, server.chat(body))

    @app.get("/v1/models")
    async def models() -> dict:
        name = backend.model_name
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": server.started, "owned_by": "raylm",
            "root": name, "parent": None, "max_model_len": backend.max_model_len, "permission": []}]}

    @app.get("/health")
    async def health() -> Response:
        """200 while a worker group serves, else 503; with the cluster's backends the
        body is {"status", "groups": [{"id", "state", "last_step_age_s"}]}."""
        if hasattr(backend, "health"):
            try:
                body = await backend.health()
            except Exception:  # the router cannot be reached: say so, and nothing more
                return JSONResponse({"status": "unavailable", "groups": []}, status_code=503)
            return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
        try:
            await backend.check_health()
        except Exception as exc:  # the details (Ray's, perhaps) go to the log only
            logger.warning("health check failed: %s", exc)
            return _error(503, "the engine cannot serve now; retry later")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await backend.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    add_tokenize_routes(app, backend, server._guard, server._check_model)

    if api_key:  # inside the rejection log that add_error_handlers puts outermost
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    add_error_handlers(app)
    return app


# ---- errors ----------------------------------------------------------------------
_error = error_response


# ---- running a request -----------------------------------------------------------
async def _unless_disconnected(raw: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it if the client disconnects first: ASGI servers leave a
    handler running after its client has gone, and its requests would hold KV blocks."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (Ray Serve does that)
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return task.result()


async def _wait_disconnect(raw: Request) -> None:
    # FastAPI has read the body, so the next ASGI message is the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


_JSON = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps with options builds one a call


def _sse(obj: Any) -> str:
    return f"data: {_JSON.encode(obj)}\n\n"


class _OpenAIServer:
    """The two generation routes: checks, tokenization, then the backend streams."""

    def __init__(self, backend, max_n: int, auto_parser=None,
                 max_prompts: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
                 max_seqs: int = DEFAULT_MAX_SEQS_PER_REQUEST, reasoning_parser: Optional[str] = None):
        self.backend = backend
        self.reasoning_parser = reasoning_parser
        self.max_n = max_n
        self.max_prompts, self.max_seqs = max_prompts, max_seqs
        self.auto_parser = auto_parser  # the tool parser class of tool_choice "auto", if enabled
        # The cores' structured_outputs_config, which checks a request's output constraint here.
        self.grammar_config = getattr(backend, "grammar_config", DEFAULT_CONFIG)
        self.started = int(time.time())

    # ---- shared checks -------------------------------------------------------------
    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.backend.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")

    def _max_tokens(self, num_prompt: int, requested: Optional[int], field: str, prompt_field: str) -> int:
        """vLLM's context check; None means the rest of the context."""
        limit = self.backend.max_model_len
        if num_prompt >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                           f"your request has {num_prompt} input tokens. Please reduce the length "
                           f"of the input messages.", prompt_field)
        if requested is None:  # the model's max_new_tokens, if it has one, within the context
            return min(limit - num_prompt, self.defaults.get("max_tokens", limit))
        if requested < 1:
            raise ApiError(400, f"{field} must be >= 1, got {requested}", field)
        if num_prompt + requested > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {num_prompt + requested} tokens ({num_prompt} in the messages, "
                           f"{requested} in the completion). Please reduce the length of the messages "
                           f"or completion.", field)
        return requested

    @property
    def defaults(self) -> dict:
        """The model's sampling defaults for fields a request leaves out (see
        `ModelConfig.default_sampling`); {} for a backend without them."""
        return getattr(self.backend, "default_sampling", None) or {}

    @property
    def vocab_size(self) -> int:
        inputs = getattr(self.backend, "inputs", None)  # the engine's own bound, when it has one
        return getattr(inputs, "vocab_size", None) or len(self.backend.tokenizer)

    def _check_logprobs(self, **requested: Optional[int]) -> None:
        limit = getattr(self.backend, "max_logprobs", None)  # optional in the Backend protocol
        for field, k in requested.items():
            if limit is not None and k is not None and k > limit:
                raise ApiError(400, f"{field} must be <= {limit} (the server's max_logprobs), got {k}", field)

    async def _guard(self, work: Awaitable[Response]) -> Response:
        try:
            return await work
        except ApiError as exc:
            return _error(exc.status, exc.message, exc.param)
        except Exception as exc:
            return _error(500, internal_error_message(exc, "a request"))

    async def _run(self, body, prompts: list[PromptInput], request_id: str, renames: dict,
                   respond: Callable[[list[RequestOutput]], dict], stream) -> Response:
        """Start the backend streams, then answer with JSON or SSE; the backend's
        ValueError (bad input) is a 400."""
        streams = _Streams(self.backend, [
            ({"prompt_token_ids": p.ids} if p.text is None else {"prompt": p.text, "prompt_token_ids": p.ids},
             p.params, request_id if len(prompts) == 1 else f"{request_id}-{i}")
            for i, p in enumerate(prompts)])
        try:
            await streams.start()
            if body.stream:  # the event stream closes the backend streams when it ends
                return StreamingResponse(self._events(streams, stream), media_type="text/event-stream")
            result = respond(await streams.finals())
        except ValueError as exc:
            await streams.close()
            if not is_client_error(exc):
                raise
            return _error(400, str(exc), param_of(str(exc), type(body).model_fields, renames))
        except Overloaded as exc:
            await streams.close()
            response = _error(429, str(exc))
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        except NoGroupAvailable as exc:
            await streams.close()
            response = _error(503, str(exc))
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        except BaseException:
            await streams.close()
            raise
        await streams.close()
        return JSONResponse(result)

    async def _events(self, streams: _Streams, stream) -> AsyncIterator[str]:
        """The SSE events, one write per output: a step's chunks together, and a
        prompt's last ones held back to go with the usage chunk and `[DONE]`
        (one write at the end instead of three)."""
        held = ""
        try:
            if first := "".join(map(_sse, stream.first_chunks())):
                yield first
            async for i, out in streams.outputs():
                held += "".join(map(_sse, stream.chunks(i, out)))
                if held and not out.finished:
                    yield held
                    held = ""
            if (chunk := stream.usage_chunk()) is not None:
                held += _sse(chunk)
        except Exception as exc:  # the response has started: report in-band, as vLLM does
            if is_client_error(exc):
                logger.warning("stream ended by a refused input: %s", exc)
                held += _sse(error_body(400, str(exc)))
            else:
                held += _sse(error_body(500, internal_error_message(exc, "a response stream")))
        finally:
            await streams.close()
        yield held + _DONE

    # ---- /v1/completions -----------------------------------------------------------
    def completions(self, body: CompletionRequest) -> Awaitable[Response]:
        return self._guard(self._completions(body))

    async def _completions(self, body: CompletionRequest) -> Response:
        check_text(body)
        self._check_model(body.model)
        body.check(self.max_n)
        body.check_size(self.max_prompts, self.max_seqs)
        self._check_logprobs(logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs)
        extra = {"logit_bias": body.check_token_ids(self.vocab_size),
                 "structured_outputs": structured_outputs_of(body, self.grammar_config)}
        tok = self.backend.tokenizer
        given = body.prompt_list()
        encoded = await off_loop(lambda: [tok.encode(p) if isinstance(p, str) else list(p) for p in given],
                                 text_size(given))
        prompts = []
        try:
            for p, ids in zip(given, encoded):
                text = p if isinstance(p, str) else None
                if not ids:
                    raise ApiError(400, "prompt is empty (0 tokens); it needs at least 1 token", "prompt")
                max_tokens = self._max_tokens(len(ids), body.max_tokens, "max_tokens", "prompt")
                params = body.to_sampling_params(max_tokens, self.defaults, **extra)
                prompts.append(PromptInput(ids, text, params))
        except ValueError as exc:
            return _error(400, str(exc), param_of(str(exc), CompletionRequest.model_fields, {}))
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = response_head(rid, "text_completion", int(time.time()), self.backend.model_name)
        return await self._run(body, prompts, rid, {},
                               lambda finals: completion_response(head, tok, body, prompts, finals),
                               CompletionStream(head, tok, body, prompts))

    # ---- /v1/chat/completions ------------------------------------------------------
    def chat(self, body: ChatCompletionRequest) -> Awaitable[Response]:
        return self._guard(self._chat(body))

    async def _chat(self, body: ChatCompletionRequest) -> Response:
        check_text(body)
        self._check_model(body.model)
        body.check(self.max_n)
        body.check_size(self.max_prompts, self.max_seqs)
        self._check_logprobs(top_logprobs=body.top_logprobs if body.logprobs else None,
                             prompt_logprobs=body.prompt_logprobs)
        mode = tool_mode(body, self.auto_parser)
        structured = structured_outputs_of(body, self.grammar_config)
        forced = forced_tool_outputs(body, mode, self.grammar_config)
        if structured is not None and forced is not None:
            raise ApiError(400, f"tool_choice {body.tool_choice!r} constrains the output itself; it cannot be "
                           "combined with response_format, structured_outputs or guided_*", "tool_choice")
        if body.echo and mode.active:
            raise ApiError(400, "echo cannot be combined with tool calls (tool_choice other than 'none')", "echo")
        extra = {"logit_bias": body.check_token_ids(self.vocab_size), "structured_outputs": structured or forced}
        tok = self.backend.tokenizer
        field = body.max_tokens_field
        renames = {"logprobs": "top_logprobs", "max_tokens": field, "prompt": "messages"}
        text, ids = await render_chat(tok, body)
        if not ids:
            return _error(400, "messages render to an empty prompt (0 tokens)", "messages")
        try:
            max_tokens = self._max_tokens(len(ids), body.requested_max_tokens(), field, "messages")
            prompt = PromptInput(ids, text, body.to_sampling_params(max_tokens, self.defaults, **extra))
        except ValueError as exc:
            return _error(400, str(exc), param_of(str(exc), ChatCompletionRequest.model_fields, renames))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = response_head(rid, "chat.completion", int(time.time()), self.backend.model_name)
        chunk_head = dict(head, object="chat.completion.chunk")
        echo = body.echo_text()
        inside = None if self.reasoning_parser is None else starts_inside(text)
        return await self._run(body, [prompt], rid, renames,
                               lambda finals: chat_response(head, tok, body, prompt, finals[0], mode, echo, inside),
                               ChatStream(chunk_head, tok, body, [prompt], mode, echo, inside))

