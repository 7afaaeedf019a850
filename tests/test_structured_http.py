"""Structured outputs and tool calling over HTTP on a random tiny model (byte-level
tokenizer, so it can spell any JSON): response_format json_schema whole and streamed
with n=2 (the official openai client), aliases behave as structured_outputs, bad
specs are a 400 naming the field, tool_choice named / required give tool_calls whose
arguments validate, a `role: "tool"` follow-up works, and SmolLM2 fills a named tool."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from raylm.cluster.local import LocalCluster
from raylm.cluster.openai_api import create_openai_app
from raylm.engine.config import EngineArgs
from tests.test_openai_api import _client, events

pytestmark = pytest.mark.anyio
C, CC = "/v1/completions", "/v1/chat/completions"
CHAT = [{"role": "user", "content": "The quick brown fox"}]
# Bounded output (booleans, enums, at most 4 blanks in a row): a random model finishes it.
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "parameters": {
             "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
             "additionalProperties": False}}}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
async def sched(llama_dir, request):
    # Asynchronous scheduling: grammar steps defer their sampling and pipeline (as on a GPU).
    s = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=256, block_size=8,
                                max_num_seqs=8, async_scheduling=request.param), served_model_name="tiny")
    yield s
    await s.shutdown()


@pytest.fixture(scope="module")
async def client(sched):
    async with _client(create_openai_app(sched)) as c:
        yield c


@pytest.fixture(scope="module")
async def oa(client):
    import openai

    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=client)


def _error(r, param):
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    return r.json()["error"]["message"]


async def test_json_schema_whole_and_streamed_with_n(oa):
    common = dict(model="tiny", messages=CHAT, n=2, temperature=1.0, seed=5, max_tokens=80,
                  response_format=RESPONSE_FORMAT)
    whole = await oa.chat.completions.create(**common)
    stream = await oa.chat.completions.create(**common, stream=True)
    texts, finish = {0: "", 1: ""}, {}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert len(whole.choices) == 2
    for c in whole.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert texts[c.index] == c.message.content and finish[c.index] == "stop"  # seeded: the same
    comp = await oa.completions.create(model="tiny", prompt="Once upon a time", max_tokens=80, n=2, temperature=1.0,
                                       seed=3, extra_body={"response_format": RESPONSE_FORMAT})
    for c in comp.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)


async def test_aliases_behave_like_structured_outputs(client):
    base = dict(prompt="The lazy dog", max_tokens=100, temperature=1.0, seed=7)
    specs = [("guided_json", "json", SCHEMA), ("guided_regex", "regex", "(yes|no)-[0-9]{2}"),
             ("guided_choice", "choice", ["red", "green", "blue"]),
             ("guided_grammar", "grammar", 'root ::= "a" ("b" | "c")+ "."')]
    for alias, key, value in specs:
        for path, body in ((C, base), (CC, dict(base, messages=CHAT, prompt=None))):
            body = {k: v for k, v in body.items() if v is not None}
            by_alias = (await client.post(path, json={**body, alias: value})).json()["choices"][0]
            so = (await client.post(path, json={**body, "structured_outputs": {key: value}})).json()["choices"][0]
            assert by_alias == so, alias
            text = so["text"] if path == C else so["message"]["content"]
            assert so["finish_reason"] == "stop", (alias, text)
            if key == "choice":
                assert text in value
            elif key == "json":
                jsonschema.validate(json.loads(text), SCHEMA)
    r = await client.post(C, json={**base, "structured_outputs": {"json_object": True}})
    assert r.status_code == 200 and isinstance(json.loads(r.json()["choices"][0]["text"]), dict)


async def test_bad_specs_are_400_naming_the_field(client):
    body = dict(messages=CHAT, max_tokens=8)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    msg = _error(await client.post(CC, json={**body, "response_format": bad_schema}),
                 "response_format.json_schema.schema")
    assert msg.startswith("response_format.json_schema.schema is invalid: ")
    assert _error(await client.post(CC, json={**body, "guided_regex": "(unclosed"}), "guided_regex") \
        .startswith("guided_regex is invalid: ")
    _error(await client.post(CC, json={**body, "structured_outputs": {"grammar": "root ::= ("}}),
           "structured_outputs.grammar")
    _error(await client.post(CC, json={**body, "structured_outputs": {"regex": "a", "choice": ["b"]}}),
           "structured_outputs")
    _error(await client.post(CC, json={**body, "structured_outputs": {"jsn": {}}}), "structured_outputs.jsn")
    assert "cannot both be set" in _error(await client.post(
        CC, json={**body, "guided_choice": ["a"], "response_format": {"type": "json_object"}}), "guided_choice")
    _error(await client.post(CC, json={**body, "response_format": {"type": "xml"}}), "response_format.type")
    _error(await client.post(C, json={"prompt": "x", "guided_json": {"type": "object"}, "guided_regex": "a"}),
           "guided_regex")
    ok = await client.post(CC, json={**body, "response_format": {"type": "text"}})
    assert ok.status_code == 200, ok.text


async def test_named_and_required_tool_choice(client, oa):
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = await oa.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, tool_choice=named,
                                            max_tokens=80, temperature=0)
    (choice,) = resp.choices
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    stream = await oa.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, tool_choice=named,
                                              max_tokens=80, temperature=0, stream=True)
    calls, finish = {}, None
    async for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] = entry["name"] or (d.function.name if d.function else None)
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "stop"
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call.function.arguments

    for parallel in (False, True):
        body = dict(messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=1,
                    n=2, parallel_tool_calls=parallel)
        choices = (await client.post(CC, json=body)).json()["choices"]
        for c in choices:
            if c["finish_reason"] == "length":
                continue  # parallel calls may run past max_tokens; nothing to check then
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
            assert 1 <= len(c["message"]["tool_calls"]) and (parallel or len(c["message"]["tool_calls"]) == 1)
            for tc in c["message"]["tool_calls"]:
                jsonschema.validate(json.loads(tc["function"]["arguments"]), PARAMS[tc["function"]["name"]])
        assert parallel or all(c["finish_reason"] == "tool_calls" for c in choices)
        chunks = events(await client.post(CC, json={**body, "stream": True}))
        streamed = [d for ch in chunks for c in ch["choices"] for d in c["delta"].get("tool_calls", [])]
        names = [d["function"]["name"] for d in streamed if "id" in d]
        assert sorted(names) == sorted(tc["function"]["name"] for c in choices for tc in c["message"]["tool_calls"])


async def test_tool_choice_errors(client):
    body = dict(messages=CHAT, max_tokens=4)
    assert "--enable-auto-tool-choice" in _error(await client.post(CC, json={**body, "tools": TOOLS}), "tool_choice")
    _error(await client.post(CC, json={**body, "tools": TOOLS, "tool_choice": "auto"}), "tool_choice")
    unknown = {"type": "function", "function": {"name": "fly"}}
    assert "'fly'" in _error(await client.post(CC, json={**body, "tools": TOOLS, "tool_choice": unknown}),
                             "tool_choice")
    _error(await client.post(CC, json={**body, "tool_choice": "required"}), "tool_choice")
    _error(await client.post(CC, json={**body, "tools": [{"type": "custom", "custom": {"name": "x"}}],
                                       "tool_choice": "none"}), "tools")
    _error(await client.post(CC, json={**body, "tools": TOOLS, "tool_choice": "required",
                                       "response_format": {"type": "json_object"}}), "tool_choice")
    r = await client.post(CC, json={**body, "tools": TOOLS, "tool_choice": "none"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []


async def test_tool_result_follow_up(client):
    messages = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21}'}]
    r = await client.post(CC, json=dict(messages=messages, tools=TOOLS, tool_choice="none", max_tokens=6,
                                        temperature=0, ignore_eos=True))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    bad = [dict(messages[1], tool_calls=[{"id": "c", "type": "function",
                                          "function": {"name": "f", "arguments": "{oops"}}])]
    _error(await client.post(CC, json=dict(messages=CHAT + bad, max_tokens=2)), "messages")


# ---- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def smol():
    s = LocalCluster(EngineArgs(model=None, dtype="float32", max_model_len=512, max_num_seqs=2))
    yield s
    await s.shutdown()


async def test_smollm2_fills_a_named_tool(smol):
    async with _client(create_openai_app(smol)) as http:
        question = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
        r = await http.post(CC, json=dict(messages=question, tools=TOOLS[:1], max_tokens=40, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        assert r.status_code == 200, r.text
        (call,) = r.json()["choices"][0]["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, WEATHER)
        assert args["city"] == "Paris"


async def test_logit_bias_and_allowed_token_ids_shape_the_output(client, sched):
    tok = sched.tokenizer
    target = tok.encode("The")[0]
    allowed = tok.encode(" the cat")  # each token's text is a whole piece: " the", " c", "at"
    pieces = "|".join(re.escape(tok.decode([t])) for t in allowed)
    body = dict(prompt="The quick brown", max_tokens=6, temperature=0, ignore_eos=True)
    for path, extra in ((C, {}), (CC, {"messages": CHAT, "prompt": None})):
        req = {k: v for k, v in {**body, **extra}.items() if v is not None}
        r = (await client.post(path, json={**req, "logit_bias": {str(target): 100}})).json()["choices"][0]
        assert (r["text"] if path == C else r["message"]["content"]) == "The" * 6
        r = (await client.post(path, json={**req, "allowed_token_ids": allowed, "temperature": 1.0,
                                           "seed": 2})).json()["choices"][0]
        assert re.fullmatch(f"(?:{pieces})+", r["text"] if path == C else r["message"]["content"])


async def test_auto_tool_choice_parses_the_model_text(sched):
    """A choice grammar makes the model write a hermes call; the server parses it."""
    call = 'Sure.<tool_call>{"name": "now", "arguments": {"utc": true}}</tool_call>'
    app = create_openai_app(sched, enable_auto_tool_choice=True, tool_call_parser="hermes")
    body = dict(messages=CHAT, tools=TOOLS, max_tokens=100, temperature=0, n=2,
                structured_outputs={"choice": [call]})
    async with _client(app) as c:
        for tool_choice in ({}, {"tool_choice": "auto"}):
            choices = (await c.post(CC, json={**body, **tool_choice})).json()["choices"]
            for ch in choices:
                assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] == "Sure."
                (tc,) = ch["message"]["tool_calls"]
                assert tc["function"]["name"] == "now" and json.loads(tc["function"]["arguments"]) == {"utc": True}
        chunks = events(await c.post(CC, json={**body, "stream": True}))
        for i in range(2):
            mine = [ch["choices"][0] for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == i]
            assert "".join(m["delta"].get("content") or "" for m in mine) == "Sure."
            deltas = [d for m in mine for d in m["delta"].get("tool_calls", [])]
            assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "now"
            assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"utc": True}
            assert [m["finish_reason"] for m in mine if m["finish_reason"]] == ["tool_calls"]
        plain = (await c.post(CC, json={**body, "structured_outputs": {"choice": ["no call"]}})).json()
        assert plain["choices"][0]["message"] == {"role": "assistant", "content": "no call", "tool_calls": []}
        assert plain["choices"][0]["finish_reason"] == "stop"
