"""The OpenAI wire format, without I/O: request models and their `SamplingParams`, and
the error body. Responses (whole or streamed, logprobs included) are in `responses.py`.

Field names and defaults follow vLLM's OpenAI server (itself following OpenAI), so a
client written against vLLM works unchanged. Every field may also be sent as `null`,
which means its default. Models are strict (no "0.5" for a float, no `true` for an
int). A field outside `field_table` is a 400 ("Unrecognized request argument supplied"),
one the table refuses is a 400 naming it, and one it marks "no effect" is accepted.
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict

from raylm.cluster.field_table import REFUSED, TABLES, status_of
from raylm.engine.input_processor import unencodable_text
from raylm.engine.model_config import with_sampling_defaults
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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _printable(text: Optional[str]) -> Optional[str]:
    """`text` without terminal colour codes and with lone surrogates escaped, so it can
    always be sent as UTF-8 JSON."""
    if text is None:
        return None
    return _ANSI.sub("", str(text)).encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    try:
        err_type = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:  # not a status http knows
        err_type = "APIError"
    return {"error": {"message": _printable(message), "type": err_type, "param": _printable(param),
                      "code": status}}


def check_text(body: BaseModel) -> None:
    """Every string of a request (keys included, extra fields too) is valid UTF-8 text:
    a 400 naming the first that is not (a lone surrogate such as "\\ud800")."""
    for name in list(type(body).model_fields) + list(body.model_extra or {}):
        value = getattr(body, name, None)
        if isinstance(value, BaseModel):
            value = value.model_dump()
        elif isinstance(value, list):
            value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
        if value is not None and (why := unencodable_text(value, name)):
            raise ApiError(400, why, name)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(OpenAIBaseModel):
    include_usage: Optional[bool] = True  # vLLM's default: stream_options={} includes usage


# Request fields that map one to one onto SamplingParams fields.
_PASSED = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop",
           "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
           "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
           "allowed_token_ids", "bad_words")


class _SamplingRequest(OpenAIBaseModel):
    """Fields /v1/completions and /v1/chat/completions share (OpenAI's, then vLLM's extras).
    Fields without an effect (`field_table`) are kept in `model_extra` and checked there."""

    model_config = ConfigDict(extra="allow", strict=True)
    ROUTE: ClassVar[str] = ""  # the field_table route: "chat" or "completions"
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
    logit_bias: Optional[dict[str, float]] = None
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
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # output constraints (structured_request.py): at most one of them
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def num_prompts(self) -> int:
        return 1

    def check_size(self, max_prompts: int, max_seqs: int) -> None:
        """The prompts and sequences (prompts x n) this request creates are within the
        server's max_prompts_per_request and max_seqs_per_request."""
        prompts, n = self.num_prompts(), self.n or 1
        if prompts > max_prompts:
            raise ApiError(400, f"prompt holds {prompts} prompts; max_prompts_per_request is {max_prompts}",
                           "prompt")
        if prompts * n > max_seqs:
            raise ApiError(400, f"this request creates {prompts} prompt(s) x n={n} = {prompts * n} "
                           f"sequences; max_seqs_per_request is {max_seqs}", "n")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self, max_n: int) -> None:
        """Checks that need no tokenizer; raise ApiError(400) naming the field."""
        self._check_fields()
        if self.n is not None and self.n > max_n:
            raise ApiError(400, f"n must be <= {max_n}, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options can only be set when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise ApiError(400, "prompt_logprobs are not available when stream is true", "prompt_logprobs")

    def _check_fields(self) -> None:
        """Every field not declared here must be one field_table accepts without effect."""
        for name, value in (self.model_extra or {}).items():
            status = status_of(self.ROUTE, name)
            if status is None:
                raise ApiError(400, f"Unrecognized request argument supplied: {name}", name)
            if status == REFUSED and value is not None:
                note = next(t[name][1] for t in TABLES[self.ROUTE] if name in t)
                raise ApiError(400, f"{name} is not supported by this server" + (f" ({note})" if note else ""),
                               name)

    def check_token_ids(self, vocab_size: int) -> Optional[dict[int, float]]:
        """Check the token ids of logit_bias and allowed_token_ids against the vocabulary;
        returns logit_bias with int keys (OpenAI sends them as strings)."""
        for t in self.allowed_token_ids or []:
            if not 0 <= t < vocab_size:
                raise ApiError(400, f"allowed_token_ids entry {t} is outside the vocabulary [0, {vocab_size})",
                               "allowed_token_ids")
        if self.logit_bias is None:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not re.fullmatch(r"\s*[0-9]+\s*", key):  # ASCII digits: int() takes "٣" too
                raise ApiError(400, f"logit_bias keys must be token ids (integers, as strings), got {key!r}",
                               "logit_bias")
            if not int(key) < vocab_size:
                raise ApiError(400, f"logit_bias token id {int(key)} is outside the vocabulary [0, {vocab_size})",
                               "logit_bias")
            bias[int(key)] = value
        return bias

    def _sampling_params(self, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int],
                         defaults: Optional[dict] = None, **extra) -> SamplingParams:
        """SamplingParams from the fields that were set, then `defaults` (the model's
        generation_config, `ModelConfig.default_sampling`) for those left out, then
        SamplingParams' own; `extra` (structured_outputs, logit_bias: checked by the
        server). Raises ValueError naming the field for out-of-range values."""
        given = {k: getattr(self, k) for k in _PASSED if getattr(self, k) is not None}
        given = with_sampling_defaults(given, defaults or {})
        return SamplingParams(**given, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              **{k: v for k, v in extra.items() if v is not None})


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    ROUTE: ClassVar[str] = "completions"
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # as in vLLM and OpenAI; null: the rest of the context
    echo: Optional[bool] = None
    logprobs: Optional[int] = None  # top-k per token, in OpenAI's completions format
    best_of: Optional[int] = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ApiError(400, f"best_of must equal n ({self.n or 1}) or be null, got {self.best_of}; "
                           "best_of > n is not supported", "best_of")
        if self.logprobs is not None and self.logprobs < 0:
            raise ApiError(400, f"logprobs must be >= 0, got {self.logprobs}", "logprobs")
        if self.prompt == [] or self.prompt == "" or any(p in ("", []) for p in self.prompt_list()):
            raise ApiError(400, "prompt is empty; it needs at least 1 token", "prompt")

    def num_prompts(self) -> int:
        return len(self.prompt_list())

    def prompt_list(self) -> list[Union[str, list[int]]]:
        """The prompts of this (possibly batched) request: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_sampling_params(self, max_tokens: int, defaults: Optional[dict] = None, **extra) -> SamplingParams:
        # With echo, the prompt's logprobs come back too (vLLM does the same).
        prompt_lps = self.prompt_logprobs
        if prompt_lps is None and self.echo:
            prompt_lps = self.logprobs
        return self._sampling_params(max_tokens, self.logprobs, prompt_lps, defaults, **extra)


class ChatMessage(BaseModel):
    """One message; unknown keys (name, tool_calls, tool_call_id) reach the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(OpenAIBaseModel):
    """One of `tools`; only {"type": "function", "function": {...}} is supported."""

    type: str
    function: Optional[FunctionDefinition] = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    ROUTE: ClassVar[str] = "chat"
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name; wins over max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    echo: Optional[bool] = None  # vLLM's: prepend the last message when its role is the reply's
    modalities: Optional[list[str]] = None
    tools: Optional[list[ChatTool]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None

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
        for i, m in enumerate(self.messages):  # the template iterates them: a list of objects
            calls = (m.model_extra or {}).get("tool_calls")
            if calls is not None and not (isinstance(calls, list)
                                          and all(isinstance(c, dict) for c in calls)):
                got = repr(calls)
                raise ApiError(400, f"messages[{i}].tool_calls must be a list of tool call objects, got "
                               f"{got if len(got) <= 80 else got[:77] + '...'}", "messages")
        if self.top_logprobs is not None:
            if self.top_logprobs < 0:
                raise ApiError(400, f"top_logprobs must be >= 0, got {self.top_logprobs}", "top_logprobs")
            if self.top_logprobs > 0 and not self.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           "continue_final_message")
        # A template is code the server runs: vLLM refuses a request's unless trusted by a flag.
        if (self.chat_template_kwargs or {}).get("chat_template") is not None:
            raise ApiError(400, "chat_template_kwargs.chat_template is refused: the server renders messages "
                           "with the model's own chat template, not one a request sends",
                           "chat_template_kwargs")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise ApiError(400, f"modalities must be ['text'] (no audio output), got {self.modalities}",
                           "modalities")
        for i, tool in enumerate(self.tools or []):
            if tool.type != "function" or tool.function is None:
                raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}, "
                               f"got type {tool.type!r}", "tools")

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as chat-template dicts, content parts joined into one string (as
        vLLM does for text-only models)."""
        out = []
        for i, m in enumerate(self.messages):
            d = m.model_dump(exclude_none=True)
            d["content"] = _message_text(m.content, i)
            for call in d.get("tool_calls") or []:  # templates want arguments as a dict (as vLLM)
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        raise ApiError(400, f"messages[{i}].tool_calls: arguments must be a JSON string, "
                                       f"got {fn['arguments']!r}", "messages") from None
            out.append(d)
        return out

    def echo_text(self) -> str:
        """vLLM's chat echo: the last message's content when its role is the reply's."""
        if not self.echo:
            return ""
        conv_add, _ = self._template_flags()
        last = self.messages[-1]
        role = "assistant" if conv_add else last.role
        return _message_text(last.content, len(self.messages) - 1) if last.role == role else ""

    def _template_flags(self) -> tuple[bool, bool]:
        cont = bool(self.continue_final_message)
        add = self.add_generation_prompt if self.add_generation_prompt is not None else not cont
        return add, cont

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `tokenizer.apply_chat_template(..., tokenize=False)`."""
        add, cont = self._template_flags()
        kwargs = {**(self.chat_template_kwargs or {}), "add_generation_prompt": add,
                  "continue_final_message": cont, "tokenize": False}
        if self.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return kwargs

    def to_sampling_params(self, max_tokens: int, defaults: Optional[dict] = None, **extra) -> SamplingParams:
        k = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, k, self.prompt_logprobs, defaults, **extra)


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
