"""Tool calling on /v1/chat/completions: which mode a request asks for, and turning each
choice's text into OpenAI's `tool_calls`, whole or streamed.

    none      tools reach the chat template; the output is content
    auto      the model's text is parsed by the server's `--tool-call-parser`
    required  structured outputs force a JSON array of {"name", "arguments"} calls
    named     structured outputs force the named function's arguments

finish_reason is "tool_calls" for auto (when a call was made) and required, "stop" for
a named function (as OpenAI answers); "length" stays "length".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from raylm.cluster.protocol import ApiError
from raylm.cluster.structured_request import named_tool_schema, required_tools_schema
from raylm.cluster.tool_parsers import ToolCall, ToolParser
from raylm.engine.sampling_params import StructuredOutputsParams
from raylm.engine.structured_outputs import DEFAULT_CONFIG, GrammarConfig, validate_structured_outputs


@dataclass
class ToolMode:
    kind: str = "none"  # "none", "auto", "required" or "named"
    name: Optional[str] = None
    parser: Optional[type[ToolParser]] = None

    @property
    def active(self) -> bool:
        return self.kind != "none"


def tool_mode(body, auto_parser: Optional[type[ToolParser]]) -> ToolMode:
    """The request's mode (vLLM's rules: tools without tool_choice mean "auto", which
    needs --enable-auto-tool-choice and --tool-call-parser); ApiError(400) naming the field."""
    tools = body.tools or []
    names = [t.function.name for t in tools]
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise ApiError(400, f"tool_choice {choice!r} needs tools: tools is empty or not set", "tool_choice")
    if choice == "none":
        return ToolMode()
    if choice == "auto":
        if auto_parser is None:
            raise ApiError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                           'to be set', "tool_choice")
        return ToolMode("auto", parser=auto_parser)
    if choice == "required":
        return ToolMode("required")
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not among tools {names}",
                           "tool_choice")
        return ToolMode("named", name=name)
    raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                   f"'function': {{'name': ...}}}}, got {choice!r}", "tool_choice")


def forced_tool_outputs(body, mode: ToolMode, config: GrammarConfig = DEFAULT_CONFIG) -> Optional[StructuredOutputsParams]:
    """The constraint that enforces `required` or a named function, else None."""
    tools = {t.function.name: t.function.parameters for t in body.tools or []}
    if mode.kind == "named":
        so = StructuredOutputsParams(json=named_tool_schema(tools[mode.name]))
    elif mode.kind == "required":
        parallel = body.parallel_tool_calls is not False
        so = StructuredOutputsParams(json=required_tools_schema(list(tools.items()), parallel))
    else:
        return None
    try:
        validate_structured_outputs(so, config)
    except ValueError as exc:
        message = str(exc).replace("structured_outputs.json is invalid", "the tools' parameters schemas do not compile")
        raise ApiError(400, f"tools: {message}", "tools") from None
    return so


def _forced_calls(mode: ToolMode, text: str) -> Optional[list[ToolCall]]:
    """The calls in a forced (required/named) output; None when it is not complete JSON
    (the output was cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if mode.kind == "named":
        return [ToolCall(mode.name, json.dumps(value, ensure_ascii=False))]
    return [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in value]


def choice_tool_calls(mode: ToolMode, text: str, finish_reason: Optional[str]
                      ) -> tuple[Optional[str], list[ToolCall], Optional[str]]:
    """(content, calls, finish_reason) of a finished choice."""
    if mode.kind == "auto":
        content, calls = mode.parser.parse(text)
    elif mode.kind in ("required", "named"):
        calls = _forced_calls(mode, text)
        content, calls = (text, []) if calls is None else (None, calls)
    else:
        return text, [], finish_reason
    if calls and finish_reason == "stop":
        finish_reason = "stop" if mode.kind == "named" else "tool_calls"
    return content, calls, finish_reason


class ToolDeltas:
    """One streamed choice's deltas under a tool mode: content as it is known, each call
    as a delta with its id, type and name, then one with its arguments. Required and
    named calls come whole at the end."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.parser = mode.parser() if mode.kind == "auto" else None
        self.text = ""
        self.calls = 0

    def feed(self, text: str, finish_reason: Optional[str]) -> tuple[list[dict], Optional[str]]:
        """(deltas, finish_reason to send) for new text; finish_reason is None mid-stream."""
        self.text += text
        if self.parser is not None:
            events = self.parser.feed(text) + (self.parser.finish() if finish_reason else [])
        elif finish_reason is None:
            return [], None
        else:
            content, calls, _ = choice_tool_calls(self.mode, self.text, finish_reason)
            events = [("content", content)] if content else []
            events += [("call", c) for c in calls]
        deltas = []
        for kind, value in events:
            if kind == "content":
                deltas.append({"content": value})
            else:
                deltas += self._call_deltas(value)
        if finish_reason == "stop" and self.calls:
            finish_reason = "stop" if self.mode.kind == "named" else "tool_calls"
        return deltas, finish_reason

    def _call_deltas(self, call: ToolCall) -> list[dict]:
        index, self.calls = self.calls, self.calls + 1
        return [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]

