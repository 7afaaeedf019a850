"""The gRPC front (`raylm.Generate`, see raylm.proto) over any `Backend`.

`GrpcGenerateMixin` holds the two RPC methods. The Serve ingress deployment subclasses
it (setting `self.backend`) and Ray Serve's gRPC proxy calls them; `make_grpc_servicer`
serves the same methods from a plain `grpc.aio.server()`. Requests arrive as protobuf
and are converted field by field: nothing from the network is unpickled.

Status codes: bad input is INVALID_ARGUMENT with the validation message. Under Serve the
method gets a `grpc_context` (`RayServegRPCContext`) on which it sets code and details;
a unary method then returns an empty response, and the proxy copies the code onto the
call. A streaming method that has yielded nothing must raise after setting the code:
Serve (2.60+) carries the code with the exception (`gRPCStatusError`) to the proxy.
A plain grpc.aio context is aborted with the code instead.

With an API key, a call needs the metadata `authorization: Bearer KEY` (UNAUTHENTICATED
otherwise), as HTTP needs the header; a replica that is shutting down answers
UNAVAILABLE. Calls through a Python handle (no gRPC context) are trusted.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator, Optional

import grpc

from raylm.cluster import raylm_pb2 as pb
from raylm.cluster.backend import Backend, PromptType
from raylm.cluster.limits import has_api_key
from raylm.cluster.router import NoGroupAvailable, Overloaded
from raylm.engine.model_config import with_sampling_defaults
from raylm.engine.outputs import CompletionOutput, RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.engine.stop_checker import stream_holdback

# GenerateRequest fields copied to SamplingParams only when set (unset: the model's
# default, else vLLM's)...
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
                    "repetition_penalty", "logprobs", "skip_special_tokens")
# ...and those whose zero value is the default anyway.
_PLAIN_FIELDS = ("ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty",
                 "include_stop_str_in_output")


def request_to_inputs(request: pb.GenerateRequest,
                      defaults: Optional[dict] = None) -> tuple[PromptType, SamplingParams]:
    """The prompt (text or token ids) and validated SamplingParams of a request; the
    fields it leaves unset take `defaults` (the model's generation_config,
    `ModelConfig.default_sampling`), then SamplingParams' own. Raises ValueError naming
    the offending field."""
    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        raise ValueError("set exactly one of prompt and prompt_token_ids, got "
                         + ("both" if has_text else "neither"))
    prompt: PromptType = request.prompt if has_text else list(request.prompt_token_ids)
    kwargs: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONAL_FIELDS
                              if request.HasField(name)}
    kwargs.update({name: getattr(request, name) for name in _PLAIN_FIELDS})
    kwargs["stop"] = list(request.stop)
    kwargs["stop_token_ids"] = list(request.stop_token_ids)
    defaults = defaults or {}
    if "max_tokens" not in kwargs and "max_tokens" in defaults:  # the engine stops at max_model_len
        kwargs["max_tokens"] = defaults["max_tokens"]
    return prompt, SamplingParams(**with_sampling_defaults(kwargs, defaults))


def _token_logprobs(comp: CompletionOutput, start: int, num_top: int) -> list[pb.TokenLogprob]:
    """Logprob messages for comp.token_ids[start:]: the chosen token plus the top `num_top`."""
    if not comp.logprobs:
        return []
    out = []
    for token_id, position in zip(comp.token_ids[start:], comp.logprobs[start:]):
        chosen = position.get(token_id)
        ranked = sorted(position.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0,
                                                          -kv[1].logprob))
        msg = pb.TokenLogprob(token_id=token_id,
                              token=(chosen.decoded_token or "") if chosen else "",
                              logprob=chosen.logprob if chosen else float("nan"),
                              top_logprobs=[pb.TopLogprob(token_id=t, token=lp.decoded_token or "",
                                                          logprob=lp.logprob)
                                            for t, lp in ranked[:num_top]])
        if chosen is not None and chosen.rank is not None:
            msg.rank = chosen.rank
        out.append(msg)
    return out


def _completion(comp: CompletionOutput, text_start: int = 0, token_start: int = 0,
                num_top: int = 0) -> pb.Completion:
    """One completion, carrying text and tokens from the given offsets on."""
    msg = pb.Completion(index=comp.index, text=comp.text[text_start:],
                        token_ids=comp.token_ids[token_start:],
                        finish_reason=comp.finish_reason or "",
                        logprobs=_token_logprobs(comp, token_start, num_top))
    if isinstance(comp.stop_reason, str):
        msg.stop_str = comp.stop_reason
    elif isinstance(comp.stop_reason, int):
        msg.stop_token_id = comp.stop_reason
    if comp.cumulative_logprob is not None:
        msg.cumulative_logprob = comp.cumulative_logprob
    return msg


def _usage(out: RequestOutput) -> pb.Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion)


def output_to_response(out: RequestOutput, num_top_logprobs: int = 0) -> pb.GenerateResponse:
    """The full result (every completion, all text and tokens so far)."""
    return pb.GenerateResponse(
        request_id=out.request_id, prompt_token_count=len(out.prompt_token_ids),
        completions=[_completion(c, num_top=num_top_logprobs) for c in out.outputs],
        finished=out.finished, usage=_usage(out))


class StreamDeltas:
    """Turns the backend's cumulative outputs into delta responses: each completion's
    text and tokens since the previous response; completions with nothing new are left out.

    With stop strings, the last len(longest stop) - 1 characters of a running completion
    are held back: they may be the start of a stop string that the engine will cut off,
    and text already sent cannot be taken back."""

    def __init__(self, params: SamplingParams):
        self.num_top = params.logprobs or 0
        self.holdback = stream_holdback(params.stop)
        self.sent: dict[int, tuple[int, int, bool]] = {}  # index -> (chars, tokens, finished)

    def response(self, out: RequestOutput) -> Optional[pb.GenerateResponse]:
        """The delta response, or None when nothing changed and the request is running."""
        completions = []
        for c in out.outputs:
            chars, tokens, done = self.sent.get(c.index, (0, 0, False))
            ready = len(c.text) if c.finished() else max(chars, len(c.text) - self.holdback)
            if ready == chars and len(c.token_ids) == tokens and c.finished() == done:
                continue
            msg = _completion(c, chars, tokens, self.num_top)
            msg.text = c.text[chars:ready]
            completions.append(msg)
            self.sent[c.index] = (ready, len(c.token_ids), c.finished())
        if not completions and not out.finished:
            return None
        return pb.GenerateResponse(request_id=out.request_id,
                                   prompt_token_count=len(out.prompt_token_ids),
                                   completions=completions, finished=out.finished,
                                   usage=_usage(out))


class Unauthenticated(Exception):
    """A gRPC call without the server's API key."""


class ShuttingDown(Exception):
    """A gRPC call to a replica that is draining."""


# What a refused request is told: bad input, a full queue, no worker group left, no key,
# shutting down.
_REFUSED = (ValueError, Overloaded, NoGroupAvailable, Unauthenticated, ShuttingDown)


def _status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (NoGroupAvailable, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.INVALID_ARGUMENT


async def _reject(grpc_context: Any, exc: Exception) -> None:
    """Record the status of a refused request (INVALID_ARGUMENT for bad input,
    RESOURCE_EXHAUSTED for a full queue, UNAVAILABLE with no worker group or while
    shutting down, UNAUTHENTICATED without the key) with the message on the call (see
    the module doc). Returns only under Serve; raises `exc` when there is no gRPC
    context at all."""
    if grpc_context is None:  # called through a Python handle, not over gRPC
        raise exc
    code = _status_of(exc)
    details = str(exc)
    abort = getattr(grpc_context, "abort", None)
    if abort is not None:  # a grpc.aio ServicerContext: raises
        await abort(code, details)
    grpc_context.set_code(code)  # a RayServegRPCContext
    grpc_context.set_details(details)


class GrpcGenerateMixin:
    """`Generate` and `GenerateStream` of raylm.proto over `self.backend`.

    The method and argument names are what Ray Serve's gRPC proxy calls: the RPC method
    name, the request proto, and a `grpc_context` keyword it fills in. A `max_n`
    attribute, when the class has one, caps `n` as on the HTTP front; `api_key` and
    `drain` (a `raylm.cluster.drain.Drain`) admit calls as the HTTP front does."""

    backend: Backend
    max_n: Optional[int] = None
    api_key: Optional[str] = None
    drain: Any = None

    def _admit(self, grpc_context: Any) -> None:
        if grpc_context is None:  # a Python handle: trusted, in the cluster
            return
        if self.drain is not None and self.drain.draining:
            raise ShuttingDown(self.drain.refusal())
        if self.api_key:
            given = dict(grpc_context.invocation_metadata() or ()).get("authorization", "")
            if not has_api_key(given, self.api_key):
                raise Unauthenticated("invalid or missing API key: send the metadata "
                                      "'authorization: Bearer <key>'")

    def _inputs(self, request: pb.GenerateRequest,
                grpc_context: Any = None) -> tuple[PromptType, SamplingParams]:
        self._admit(grpc_context)
        prompt, params = request_to_inputs(request, getattr(self.backend, "default_sampling", None))
        if self.max_n is not None and params.n > self.max_n:
            raise ValueError(f"n must be <= {self.max_n} (max_n), got {params.n}")
        return prompt, params

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: Any = None) -> pb.GenerateResponse:
        rid = request.request_id or uuid.uuid4().hex
        try:
            prompt, params = self._inputs(request, grpc_context)
            out = await self.backend.generate(prompt, params, request_id=rid)
        except _REFUSED as exc:
            await _reject(grpc_context, exc)
            return pb.GenerateResponse()
        except asyncio.CancelledError:  # the client went away
            await self.backend.abort(rid)
            raise
        return output_to_response(out, params.logprobs or 0)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: Any = None) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            prompt, params = self._inputs(request, grpc_context)
        except _REFUSED as exc:
            await _reject(grpc_context, exc)
            raise
        deltas = StreamDeltas(params)
        stream = self.backend.generate_stream(prompt, params, request_id=rid)
        finished = started = False
        try:
            while True:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except _REFUSED as exc:
                    if started:  # a bad request fails before its first output
                        raise
                    await _reject(grpc_context, exc)
                    raise
                started, finished = True, out.finished
                msg = deltas.response(out)
                if msg is not None:
                    yield msg
        finally:
            # Reached on client cancel too (CancelledError or GeneratorExit at the yield):
            # closing the backend's iterator aborts the request and frees its KV blocks.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            elif started and not finished:
                await self.backend.abort(rid)


class GenerateServicer(GrpcGenerateMixin):
    """The mixin as a standalone servicer for a plain grpc.aio server."""

    def __init__(self, backend: Backend, api_key: Optional[str] = None,
                 max_n: Optional[int] = None, drain: Any = None):
        self.backend = backend
        self.api_key = api_key
        self.max_n = max_n
        self.drain = drain


def make_grpc_servicer(backend: Backend, api_key: Optional[str] = None,
                       max_n: Optional[int] = None, drain: Any = None) -> GenerateServicer:
    """A servicer for `raylm_pb2_grpc.add_GenerateServicer_to_server(servicer, server)`
    on a `grpc.aio.server()` (`raylm.cluster.grpc_server`, tests)."""
    return GenerateServicer(backend, api_key, max_n, drain)
