"""Tool-call parsers on canned model text (whole and streamed in every split), and the
schemas that enforce `tool_choice: required` / a named function."""
from __future__ import annotations

import json

import jsonschema
import pytest

from raylm.cluster.structured_request import required_tools_schema
from raylm.cluster.tool_calls import ToolDeltas, ToolMode, choice_tool_calls
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


# ---- required / named: the schemas and the parsing of forced outputs ----------------------------

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_required_schema_accepts_only_calls_of_the_tools():
    schema = required_tools_schema([("get_weather", PARAMS), ("now", None)], parallel=False)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}], schema)
    jsonschema.validate([{"name": "now", "arguments": {}}], schema)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "other", "arguments": {}}],
                [{"name": "now", "arguments": {}}] * 2, {"name": "now", "arguments": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    parallel = required_tools_schema([("now", None)], parallel=True)
    jsonschema.validate([{"name": "now", "arguments": {}}] * 3, parallel)


def test_forced_outputs_become_tool_calls():
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
    content, calls, finish = choice_tool_calls(ToolMode("required"), text, "stop")
    assert content is None and finish == "tool_calls"
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("now", {})]
    content, calls, finish = choice_tool_calls(ToolMode("named", name="get_weather"), '{"city": "Oslo"}', "stop")
    assert (content, _calls(calls), finish) == (None, [("get_weather", {"city": "Oslo"})], "stop")
    # cut short: the text stays content, finish_reason stays "length"
    assert choice_tool_calls(ToolMode("named", name="f"), '{"city": "Os', "length") == ('{"city": "Os', [], "length")
    assert choice_tool_calls(ToolMode(), "hi", "stop") == ("hi", [], "stop")
    content, calls, finish = choice_tool_calls(ToolMode("auto", parser=HermesToolParser),
                                               f"<tool_call>{WEATHER}</tool_call>", "stop")
    assert content is None and finish == "tool_calls" and calls[0].name == "get_weather"


def test_streamed_tool_deltas_have_openai_shape():
    deltas = ToolDeltas(ToolMode("auto", parser=HermesToolParser))
    out, finish = deltas.feed("Checking. <tool_", None)
    assert out == [{"content": "Checking. "}] and finish is None
    out, finish = deltas.feed(f"call>{WEATHER}</tool_call>", "stop")
    assert finish == "tool_calls"
    head, args = out
    (h,) = head["tool_calls"]
    assert h["index"] == 0 and h["id"].startswith("call_") and h["type"] == "function"
    assert h["function"] == {"name": "get_weather", "arguments": ""}
    assert set(args["tool_calls"][0]) == {"index", "function"}
    assert json.loads(args["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    named = ToolDeltas(ToolMode("named", name="f"))
    assert named.feed('{"a":', None) == ([], None)  # forced calls come whole at the end
    out, finish = named.feed(" 1}", "stop")
    assert finish == "stop" and out[0]["tool_calls"][0]["function"]["name"] == "f"
    assert json.loads(out[1]["tool_calls"][0]["function"]["arguments"]) == {"a": 1}


def test_auto_tool_choice_flags():
    from raylm import cli
    from raylm.cluster.app import build_app
    from raylm.cluster.tool_parsers import auto_tool_parser

    assert auto_tool_parser(True, "hermes") is HermesToolParser
    assert auto_tool_parser(False, "llama3_json") is None and auto_tool_parser(False, None) is None
    with pytest.raises(ValueError, match="enable_auto_tool_choice needs tool_call_parser"):
        auto_tool_parser(True, None)
    for bad in ({"enable_auto_tool_choice": True}, {"tool_call_parser": "pythonic"},
                {"enable_auto_tool_choice": "yes", "tool_call_parser": "hermes"}):
        with pytest.raises(ValueError, match="tool_call_parser|enable_auto_tool_choice"):
            build_app(bad)
    ns = cli.build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert (ns.enable_auto_tool_choice, ns.tool_call_parser) == (True, "hermes")
