"""The OpenAI wire format, without I/O: request models and their `SamplingParams`, and
the error body. Responses (whole or streamed, logprobs included) are in `responses.py`.

Field names and defaults follow vLLM's OpenAI server (itself following OpenAI), so a
client written against vLLM works unchanged. Every field may also be sent as `null`,
which means its default. Models are strict (no "0.5" for a float, no `true` for an
int) and ignore unknown fields, as vLLM does.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from raylm.engine.sampling_params import SamplingParams

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
