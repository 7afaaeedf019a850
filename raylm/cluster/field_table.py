"""What the server does with each request field of /v1/chat/completions and
/v1/completions: OpenAI's fields (every one classified, see tests/test_openai_fields.py,
which compares this table with the installed `openai` package's request types) and the
vLLM extra fields we document. A field in neither list is a 400 ("Unrecognized request
argument supplied: foo"): no field is silently ignored.

    supported   the field works (its note says any limit; a value we cannot honour is a 400)
    no effect   accepted; it changes nothing in the output (metadata, billing, caching hints)
    refused     any non-null value is a 400 naming the field
"""
from __future__ import annotations

from typing import Optional

SUPPORTED, NO_EFFECT, REFUSED = "supported", "no effect", "refused"

# OpenAI's chat request body (openai.types.chat.completion_create_params).
CHAT_OPENAI = {
    "messages": (SUPPORTED, "text content parts only; `tool` messages and assistant `tool_calls` work"),
    "model": (SUPPORTED, "must be the served model name (else 404)"),
    "audio": (REFUSED, "no audio output"),
    "frequency_penalty": (SUPPORTED, ""),
    "function_call": (REFUSED, "deprecated; use `tool_choice`"),
    "functions": (REFUSED, "deprecated; use `tools`"),
    "logit_bias": (SUPPORTED, "token id (string) -> bias in [-100, 100]"),
    "logprobs": (SUPPORTED, ""),
    "max_completion_tokens": (SUPPORTED, "wins over `max_tokens`"),
    "max_tokens": (SUPPORTED, ""),
    "metadata": (NO_EFFECT, ""),
    "modalities": (SUPPORTED, "`[\"text\"]` only; `audio` is a 400"),
    "moderation": (REFUSED, "no moderation model"),
    "n": (SUPPORTED, "up to the server's `--max-n`"),
    "parallel_tool_calls": (SUPPORTED, "false: at most one call with `tool_choice: required`"),
    "prediction": (NO_EFFECT, "predicted outputs only speed up OpenAI's models; the output is the same"),
    "presence_penalty": (SUPPORTED, ""),
    "prompt_cache_key": (NO_EFFECT, "prefix caching needs no key"),
    "prompt_cache_options": (NO_EFFECT, "prefix caching needs no breakpoints"),
    "prompt_cache_retention": (NO_EFFECT, ""),
    "reasoning_effort": (REFUSED, "no reasoning models' effort control"),
    "response_format": (SUPPORTED, "`text`, `json_object`, `json_schema` (structured outputs)"),
    "safety_identifier": (NO_EFFECT, ""),
    "seed": (SUPPORTED, ""),
    "service_tier": (NO_EFFECT, ""),
    "stop": (SUPPORTED, ""),
    "store": (NO_EFFECT, "nothing is stored"),
    "stream": (SUPPORTED, ""),
    "stream_options": (SUPPORTED, "`include_usage`"),
    "temperature": (SUPPORTED, ""),
    "tool_choice": (SUPPORTED, "`none`, `auto` (with `--enable-auto-tool-choice`), `required`, a named function"),
    "tools": (SUPPORTED, "`function` tools"),
    "top_logprobs": (SUPPORTED, "up to the server's `max_logprobs`"),
    "top_p": (SUPPORTED, ""),
    "user": (NO_EFFECT, ""),
    "verbosity": (REFUSED, ""),
    "web_search_options": (REFUSED, "no web search"),
}

# OpenAI's (legacy) completions request body (openai.types.completion_create_params).
COMPLETION_OPENAI = {
    "model": (SUPPORTED, "must be the served model name (else 404)"),
    "prompt": (SUPPORTED, "text, token ids, or a batch of either"),
    "best_of": (SUPPORTED, "only equal to `n` (or null)"),
    "echo": (SUPPORTED, ""),
    "frequency_penalty": (SUPPORTED, ""),
    "logit_bias": (SUPPORTED, "token id (string) -> bias in [-100, 100]"),
    "logprobs": (SUPPORTED, "up to the server's `max_logprobs`"),
    "max_tokens": (SUPPORTED, ""),
    "n": (SUPPORTED, "up to the server's `--max-n`"),
    "presence_penalty": (SUPPORTED, ""),
    "seed": (SUPPORTED, ""),
    "stop": (SUPPORTED, ""),
    "stream": (SUPPORTED, ""),
    "stream_options": (SUPPORTED, "`include_usage`"),
    "suffix": (REFUSED, "no fill-in-the-middle"),
    "temperature": (SUPPORTED, ""),
    "top_p": (SUPPORTED, ""),
    "user": (NO_EFFECT, ""),
}

# vLLM's extra fields, on both routes.
_VLLM_SHARED = {
    "top_k": (SUPPORTED, ""),
    "min_p": (SUPPORTED, ""),
    "repetition_penalty": (SUPPORTED, ""),
    "min_tokens": (SUPPORTED, ""),
    "stop_token_ids": (SUPPORTED, ""),
    "ignore_eos": (SUPPORTED, ""),
    "skip_special_tokens": (SUPPORTED, ""),
    "spaces_between_special_tokens": (SUPPORTED, ""),
    "include_stop_str_in_output": (SUPPORTED, ""),
    "prompt_logprobs": (SUPPORTED, "not with `stream`"),
    "allowed_token_ids": (SUPPORTED, ""),
    "bad_words": (SUPPORTED, ""),
    "structured_outputs": (SUPPORTED, "`json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag`, "
                                      "`disable_any_whitespace`, `whitespace_pattern` (with llguidance: the `guidance` "
                                      "backend, or `auto` where it is installed)"),
    "guided_json": (SUPPORTED, "alias of `structured_outputs.json`"),
    "guided_regex": (SUPPORTED, "alias of `structured_outputs.regex`"),
    "guided_choice": (SUPPORTED, "alias of `structured_outputs.choice`"),
    "guided_grammar": (SUPPORTED, "alias of `structured_outputs.grammar`"),
}
CHAT_VLLM = {**_VLLM_SHARED,
             "echo": (SUPPORTED, "prepends the last message's content when its role is the reply's"),
             "add_generation_prompt": (SUPPORTED, ""),
             "continue_final_message": (SUPPORTED, ""),
             "chat_template_kwargs": (SUPPORTED, "passed to the model's chat template; `chat_template` "
                                                 "inside it is refused (400)")}
COMPLETION_VLLM = {**_VLLM_SHARED,
                   "response_format": (SUPPORTED, "as on chat: `text`, `json_object`, `json_schema`")}

TABLES = {"chat": (CHAT_OPENAI, CHAT_VLLM), "completions": (COMPLETION_OPENAI, COMPLETION_VLLM)}


def status_of(route: str, field: str) -> Optional[str]:
    """SUPPORTED, NO_EFFECT or REFUSED, or None for a field the route does not know."""
    openai_fields, vllm_fields = TABLES[route]
    entry = openai_fields.get(field) or vllm_fields.get(field)
    return entry[0] if entry else None


def markdown() -> str:
    """The table as README.md shows it (a test keeps the two equal)."""
    lines = ["| Route | Field | Origin | Status | Notes |", "|---|---|---|---|---|"]
    for route, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
        for origin, table in zip(("OpenAI", "vLLM"), TABLES[route]):
            for field, (status, note) in table.items():
                lines.append(f"| `{path}` | `{field}` | {origin} | {status} | {note} |")
    return "\n".join(lines) + "\n"
