"""Tool-call parsers for `tool_choice: "auto"` (vLLM's `--tool-call-parser`): they split a
model's text into content and tool calls, incrementally (streaming) or at once.

    hermes       Qwen2.5 / Qwen3 / Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    llama3_json  Llama 3.x: a JSON object `{"name": ..., "parameters"|"arguments": {...}}`,
                 optionally after `<|python_tag|>`, several joined by `;`

A parser object is fed text pieces in order (`feed`) and then `finish()`; both return
events: `("content", text)` or `("call", ToolCall)`. `parse(text)` is the same machine fed
once, so streamed and whole responses agree. Text that looks like a call but is not
valid JSON comes back as content, never dropped.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union


def call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One call: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str
    id: str = field(default_factory=call_id)

    def to_json(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Event = tuple[str, Union[str, ToolCall]]


def _call_from(obj, args_keys: tuple[str, ...]) -> Optional[ToolCall]:
    """A ToolCall from a decoded {"name": str, <args key>: object}, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    """Base: subclasses implement `feed` and `finish`."""

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(content or None when blank, calls) of a whole output."""
        parser = cls()
        events = parser.feed(text) + parser.finish()
        content = "".join(e[1] for e in events if e[0] == "content").strip()
        return content or None, [e[1] for e in events if e[0] == "call"]


class HermesToolParser(ToolParser):
    """`<tool_call>...</tool_call>` blocks anywhere in the text; the rest is content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.pending = ""
        self.in_call = False

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while True:
            if self.in_call:
                end = self.pending.find(self.CLOSE)
                if end < 0:
                    return events
                body, self.pending = self.pending[:end], self.pending[end + len(self.CLOSE):]
                self.in_call = False
                events.append(self._call_or_content(body, closed=True))
            else:
                start = self.pending.find(self.OPEN)
                if start < 0:
                    keep = partial_suffix(self.pending, self.OPEN)
                    text_out = self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    if text_out:
                        events.append(("content", text_out))
                    return events
                if start:
                    events.append(("content", self.pending[:start]))
                self.pending = self.pending[start + len(self.OPEN):]
                self.in_call = True

    def finish(self) -> list[Event]:
        rest, self.pending = self.pending, ""
        if self.in_call:  # the model ended (EOS) inside a call: keep it if it is complete JSON
            self.in_call = False
            return [self._call_or_content(rest, closed=False)]
        return [("content", rest)] if rest else []

    def _call_or_content(self, body: str, closed: bool) -> Event:
        try:
            call = _call_from(json.loads(body), ("arguments", "parameters"))
        except ValueError:
            call = None
        if call is not None:
            return ("call", call)
        return ("content", self.OPEN + body + (self.CLOSE if closed else ""))


class Llama3JsonToolParser(ToolParser):
    """A whole output that is JSON call objects (after an optional `<|python_tag|>`),
    separated by `;`; any other output is content. Whether it is a call is known from
    its first characters; the calls themselves come at the end."""

    TAG = "<|python_tag|>"

    def __init__(self):
        self.pending = ""
        self.mode: Optional[str] = None  # None (undecided), "content" or "calls"

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        if self.mode is None:
            head = self.pending.lstrip()
            if not head or (self.TAG.startswith(head) and head != self.TAG):
                return []  # too early to tell
            self.mode = "calls" if head.startswith(("{", self.TAG)) else "content"
        if self.mode == "content":
            out, self.pending = self.pending, ""
            return [("content", out)] if out else []
        return []

    def finish(self) -> list[Event]:
        rest, self.pending = self.pending, ""
        if self.mode == "calls":
            calls = self._calls(rest)
            if calls is not None:
                return [("call", c) for c in calls]
        return [("content", rest)] if rest else []

    def _calls(self, text: str) -> Optional[list[ToolCall]]:
        text = text.strip()
        if text.startswith(self.TAG):
            text = text[len(self.TAG):]
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n;":
                pos += 1
            if pos == len(text):
                return calls or None
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class for `--tool-call-parser`; ValueError naming the choices."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {name!r}")
    return TOOL_PARSERS[name]


def auto_tool_parser(enable_auto_tool_choice: bool, tool_call_parser: Optional[str]) -> Optional[type[ToolParser]]:
    """The parser of `tool_choice: "auto"` from vLLM's two flags (None: auto is refused);
    ValueError for a bad parser name, or auto enabled without a parser."""
    if not isinstance(enable_auto_tool_choice, bool):
        raise ValueError(f"enable_auto_tool_choice must be true or false, got {enable_auto_tool_choice!r}")
    parser = None if tool_call_parser is None else get_tool_parser(tool_call_parser)
    if enable_auto_tool_choice and parser is None:
        raise ValueError(f"enable_auto_tool_choice needs tool_call_parser (one of {sorted(TOOL_PARSERS)})")
    return parser if enable_auto_tool_choice else None
