"""The OpenAI wire format, without I/O: request models and their `SamplingParams`, the
error body, logprobs in OpenAI's two shapes, and whole or streamed (chunk) responses.

Field names and defaults follow vLLM's OpenAI server (itself following OpenAI), so a
client written against vLLM works unchanged. Every field may also be sent as `null`,
which means its default. Models are strict (no "0.5" for a float, no `true` for an
int) and ignore unknown fields, as vLLM does.
"""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict

from raylm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.engine.stop_checker import stream_holdback

# JSON has no -inf; OpenAI and vLLM send this instead.
_MIN_LOGPROB = -9999.0

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "MethodNotAllowedError", 409: "ConflictError",
                422: "UnprocessableEntityError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status, a message, and the field to blame."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = int(status), message, param


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    err_type = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(OpenAIBaseModel):
    include_usage: Optional[bool] = True  # vLLM's default: stream_options={} includes usage


# Request fields that map one to one onto SamplingParams fields.
_PASSED = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop",
           "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
           "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output")


class _SamplingRequest(OpenAIBaseModel):
    """Fields /v1/completions and /v1/chat/completions share (OpenAI's, then vLLM's extras)."""

    model: Optional[str] = None
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    prompt_logprobs: Optional[int] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self, max_n: int) -> None:
        """Checks that need no tokenizer; raise ApiError(400) naming the field."""
        if self.n is not None and self.n > max_n:
            raise ApiError(400, f"n must be <= {max_n}, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options can only be set when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise ApiError(400, "prompt_logprobs are not available when stream is true", "prompt_logprobs")

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int],
                         prompt_logprobs: Optional[int]) -> SamplingParams:
        """SamplingParams from the fields that were set (None keeps SamplingParams' default);
        raises ValueError naming the field for out-of-range values."""
        given = {k: getattr(self, k) for k in _PASSED if getattr(self, k) is not None}
        return SamplingParams(**given, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # as in vLLM and OpenAI; null: the rest of the context
    echo: Optional[bool] = None
    logprobs: Optional[int] = None  # top-k per token, in OpenAI's completions format

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.logprobs is not None and self.logprobs < 0:
            raise ApiError(400, f"logprobs must be >= 0, got {self.logprobs}", "logprobs")
        if self.prompt == [] or self.prompt == "" or any(p in ("", []) for p in self.prompt_list()):
            raise ApiError(400, "prompt is empty; it needs at least 1 token", "prompt")

    def prompt_list(self) -> list[Union[str, list[int]]]:
        """The prompts of this (possibly batched) request: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        # With echo, the prompt's logprobs come back too (vLLM does the same).
        prompt_lps = self.prompt_logprobs
        if prompt_lps is None and self.echo:
            prompt_lps = self.logprobs
        return self._sampling_params(max_tokens, self.logprobs, prompt_lps)


class ChatMessage(BaseModel):
    """One message; unknown keys (name, tool_calls, tool_call_id) reach the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name; wins over max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @property
    def max_tokens_field(self) -> str:
        """The name of the field that set the completion length (for error messages)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if not self.messages:
            raise ApiError(400, "messages is empty; it needs at least 1 message", "messages")
        if self.top_logprobs is not None:
            if self.top_logprobs < 0:
                raise ApiError(400, f"top_logprobs must be >= 0, got {self.top_logprobs}", "top_logprobs")
            if self.top_logprobs > 0 and not self.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           "continue_final_message")

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as chat-template dicts, content parts joined into one string (as
        vLLM does for text-only models)."""
        out = []
        for i, m in enumerate(self.messages):
            d = m.model_dump(exclude_none=True)
            d["content"] = _message_text(m.content, i)
            out.append(d)
        return out

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `tokenizer.apply_chat_template(..., tokenize=False)`."""
        cont = bool(self.continue_final_message)
        add = self.add_generation_prompt if self.add_generation_prompt is not None else not cont
        return {**(self.chat_template_kwargs or {}), "add_generation_prompt": add,
                "continue_final_message": cont, "tokenize": False}

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        k = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, k, self.prompt_logprobs)


def _message_text(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content[{j}] has type {kind!r}; only "
                           "{'type': 'text', 'text': str} parts are supported", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


# ---- logprobs in OpenAI's two formats ------------------------------------------------
def _token_text(tokenizer, token_id: int, lp: Optional[Logprob]) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def _by_rank(step: dict) -> list:
    return sorted(step.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))


def _clamp(logprob: float) -> float:
    return max(float(logprob), _MIN_LOGPROB)


def completion_logprobs(tokenizer, token_ids: list[int], steps: list[Optional[dict]],
                        text_offset: int = 0) -> dict:
    """OpenAI completions logprobs {tokens, token_logprobs, top_logprobs, text_offset};
    a step of None (the first prompt token) gives null entries."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, step in zip(token_ids, steps):
        chosen = step.get(token_id) if step else None
        token = _token_text(tokenizer, token_id, chosen)
        out["tokens"].append(token)
        out["token_logprobs"].append(None if chosen is None else _clamp(chosen.logprob))
        # The engine's step dict holds the top-k plus the chosen token, as OpenAI returns.
        # Tokens may share a text (byte pieces read as U+FFFD): keep the likeliest.
        top = None
        if step is not None:
            top = {}
            for t, lp in _by_rank(step):
                top.setdefault(_token_text(tokenizer, t, lp), _clamp(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(tokenizer, token_ids: list[int], steps: list[dict], top_k: int) -> dict:
    """OpenAI chat logprobs {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token_id, step in zip(token_ids, steps):
        chosen = step.get(token_id)
        token = _token_text(tokenizer, token_id, chosen)
        top = _by_rank(step)
        content.append({
            "token": token, "logprob": _MIN_LOGPROB if chosen is None else _clamp(chosen.logprob),
            "bytes": list(token.encode("utf-8", "replace")),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, tid, lp)), "logprob": _clamp(lp.logprob),
                              "bytes": list(t.encode("utf-8", "replace"))} for tid, lp in top[:top_k]]})
    return {"content": content}


def prompt_logprobs_json(steps: Optional[list[Optional[dict]]]) -> Optional[list]:
    """vLLM's `prompt_logprobs` field: per prompt token null or {token_id: {logprob, rank,
    decoded_token}}."""
    if steps is None:
        return None
    return [None if step is None else {
        str(t): {"logprob": _clamp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for t, lp in step.items()} for step in steps]


# ---- responses: whole, and streamed as chunks ----------------------------------------
@dataclass
class PromptInput:
    """One tokenized prompt of a request and the params it runs with."""

    ids: list[int]
    text: Optional[str]  # None for token-id prompts
    params: SamplingParams

    def display_text(self, tokenizer) -> str:
        return self.text if self.text is not None else tokenizer.decode(self.ids)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_head(request_id: str, obj: str, created: int, model: str) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model}


def _echo_steps(out: RequestOutput, prompt: PromptInput, steps) -> list:
    return (out.prompt_logprobs or [None] * len(prompt.ids)) + list(steps or [])


def completion_response(head: dict, tokenizer, body: CompletionRequest, prompts: list[PromptInput],
                        finals: list[RequestOutput]) -> dict:
    """The /v1/completions JSON; choice index = prompt index * n + completion index."""
    choices, generated = [], 0
    for pi, (p, out) in enumerate(zip(prompts, finals)):
        for c in out.outputs:
            ids, text, steps = c.token_ids, c.text, c.logprobs
            if body.echo:
                ids, text = p.ids + ids, p.display_text(tokenizer) + text
                steps = _echo_steps(out, p, steps)
            choices.append({
                "index": pi * p.params.n + c.index, "text": text,
                "logprobs": None if body.logprobs is None else completion_logprobs(tokenizer, ids, steps),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)})
            generated += len(c.token_ids)
    choices.sort(key=lambda c: c["index"])
    return {**head, "choices": choices, "usage": usage(sum(len(p.ids) for p in prompts), generated)}


def chat_response(head: dict, tokenizer, body: ChatCompletionRequest, prompt: PromptInput,
                  final: RequestOutput) -> dict:
    """The /v1/chat/completions JSON."""
    top_k = body.top_logprobs or 0
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "tool_calls": []},
                "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs or [], top_k) if body.logprobs
                else None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for c in sorted(final.outputs, key=lambda c: c.index)]
    return {**head, "choices": choices,
            "usage": usage(len(prompt.ids), sum(len(c.token_ids) for c in final.outputs)),
            "prompt_logprobs": prompt_logprobs_json(final.prompt_logprobs)}


@dataclass
class _Sent:
    """How much of one choice a stream has sent."""

    chars: int = 0  # of the completion text
    tokens: int = 0
    offset: int = 0  # text_offset of the next logprobs token (an echoed prompt included)
    finished: bool = False


class _DeltaStream:
    """Turns cumulative outputs (text and tokens so far) into per-choice deltas.

    While a choice runs, the last `max(len(stop)) - 1` characters are held back: they
    may begin a stop string, and text once sent cannot be taken back. So the streamed
    deltas always join up to the final (non-streamed) text."""

    def __init__(self, head: dict, tokenizer, body, prompts: list[PromptInput]):
        self.head, self.tokenizer, self.body, self.prompts = head, tokenizer, body, prompts
        self.holdback = stream_holdback(prompts[0].params.stop)
        self.sent: dict[int, _Sent] = {}

    def _delta(self, index: int, c: CompletionOutput, want_tokens: bool):
        """(state, new text, first new token position), or None when there is nothing
        to send (no new text, no wanted tokens, not finishing)."""
        s = self.sent.setdefault(index, _Sent())
        if s.finished:
            return None
        text = c.text if c.finish_reason is not None else c.text[:max(0, len(c.text) - self.holdback)]
        text = text[s.chars:]
        if not text and c.finish_reason is None and not (want_tokens and len(c.token_ids) > s.tokens):
            return None
        start = s.tokens
        s.chars, s.tokens, s.finished = s.chars + len(text), len(c.token_ids), c.finish_reason is not None
        return s, text, start

    def first_chunks(self) -> Iterator[dict]:
        """Chunks sent before any output (none by default)."""
        return iter(())

    def usage_chunk(self) -> Optional[dict]:
        """The final chunk (empty choices) with stream_options.include_usage, else None."""
        if not self.body.include_usage:
            return None
        return {**self.head, "choices": [], "usage": usage(
            sum(len(p.ids) for p in self.prompts), sum(s.tokens for s in self.sent.values()))}


class CompletionStream(_DeltaStream):
    """/v1/completions chunks; with echo, a choice's first chunk starts with the prompt."""

    def chunks(self, prompt_index: int, out: RequestOutput) -> Iterator[dict]:
        p, body = self.prompts[prompt_index], self.body
        for c in out.outputs:
            index = prompt_index * p.params.n + c.index
            first = index not in self.sent
            delta = self._delta(index, c, body.logprobs is not None)
            if delta is None:
                continue
            s, text, start = delta
            ids, steps = c.token_ids[start:s.tokens], (c.logprobs or [])[start:s.tokens]
            if body.echo and first:
                text, ids = p.display_text(self.tokenizer) + text, p.ids + ids
                steps = _echo_steps(out, p, steps)
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(self.tokenizer, ids, steps, s.offset)
                s.offset += sum(len(t) for t in logprobs["tokens"])
            yield {**self.head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}


class ChatStream(_DeltaStream):
    """/v1/chat/completions chunks: a role chunk per choice, content deltas, then the
    finish_reason (with the last delta)."""

    def first_chunks(self) -> Iterator[dict]:
        for i in range(self.prompts[0].params.n):
            yield {**self.head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}

    def chunks(self, prompt_index: int, out: RequestOutput) -> Iterator[dict]:
        body = self.body
        for c in out.outputs:
            delta = self._delta(c.index, c, bool(body.logprobs))
            if delta is None:
                continue
            s, text, start = delta
            choice = {"index": c.index, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": c.finish_reason}
            if body.logprobs:
                choice["logprobs"] = chat_logprobs(self.tokenizer, c.token_ids[start:s.tokens],
                                                   (c.logprobs or [])[start:s.tokens], body.top_logprobs or 0)
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            yield {**self.head, "choices": [choice]}
