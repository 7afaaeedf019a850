"""The HTTP front's hygiene: limits on the sequences one request creates, text that is not
valid UTF-8 refused naming its field (never a 5xx), error bodies that carry nothing of the
server's insides, one log line per refused request, and /health answering while a large
prompt is tokenized."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time

import httpx
import pytest

from raylm import SamplingParams
from raylm.cluster.local import LocalCluster
from raylm.cluster.openai_api import create_openai_app
from raylm.cluster.protocol import error_body
from raylm.engine.config import EngineArgs

pytestmark = pytest.mark.anyio

NAME = "tiny"
CHAT = [{"role": "user", "content": "The quick brown fox"}]
BAD = "ab\ud800cd"  # a lone surrogate: JSON can carry it ("\ud800"), UTF-8 cannot
C, CC = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def sched(llama_dir):
    s = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=64, block_size=8,
                                max_num_seqs=16), served_model_name=NAME)
    yield s
    await s.shutdown()


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120)


@pytest.fixture(scope="module")
async def client(sched):
    app = create_openai_app(sched, max_n=4, max_prompts_per_request=8, max_seqs_per_request=12)
    async with _client(app) as c:
        yield c


async def post(client, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a client's JSON encoder would
    return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]


# ---- sequences per request ----------------------------------------------------------
async def test_prompts_and_sequences_per_request_are_limited(client, sched):
    err = error_of(await post(client, C, {"prompt": ["hi"] * 9, "max_tokens": 1}), 400)
    assert err["param"] == "prompt"
    assert err["message"] == "prompt holds 9 prompts; max_prompts_per_request is 8"
    err = error_of(await post(client, C, {"prompt": [[5, 6]] * 4, "n": 4, "max_tokens": 1}), 400)
    assert err["param"] == "n"
    assert err["message"] == ("this request creates 4 prompt(s) x n=4 = 16 sequences; "
                              "max_seqs_per_request is 12")
    ok = await post(client, C, {"prompt": [[5, 6]] * 3, "n": 4, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 12
    assert not sched.open_request_ids


async def test_default_limits_refuse_the_issues_request_before_tokenizing(sched):
    async with _client(create_openai_app(sched)) as c:  # max_n 16, 1024 prompts, 4096 sequences
        err = error_of(await post(c, C, {"prompt": ["The quick brown fox"] * 2000, "n": 16}), 400)
        assert "2000 prompts; max_prompts_per_request is 1024" in err["message"]
        err = error_of(await post(c, C, {"prompt": [[5]] * 1000, "n": 16}), 400)
        assert "16000 sequences; max_seqs_per_request is 4096" in err["message"]


# ---- text that is not UTF-8 ----------------------------------------------------------
SURROGATES = [
    (C, {"prompt": BAD}, "prompt", "prompt"),
    (C, {"prompt": ["fine", BAD]}, "prompt", "prompt[1]"),
    (C, {"prompt": "x", "stop": BAD}, "stop", "stop"),
    (C, {"prompt": "x", "stop": ["ok", BAD]}, "stop", "stop[1]"),
    (C, {"prompt": "x", "bad_words": [BAD]}, "bad_words", "bad_words[0]"),
    (C, {"prompt": "x", "model": BAD}, "model", "model"),
    (C, {"prompt": "x", "guided_regex": BAD}, "guided_regex", "guided_regex"),
    (C, {"prompt": "x", "logit_bias": {BAD: 1.0}}, "logit_bias", "logit_bias key"),
    (CC, {"messages": [{"role": "user", "content": BAD}]}, "messages", "messages[0].content"),
    (CC, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                    {"type": "text", "text": BAD}]}]},
     "messages", "messages[0].content[1].text"),
    (CC, {"messages": [{"role": BAD, "content": "x"}]}, "messages", "messages[0].role"),
    (CC, {"messages": [{"role": "user", "content": "x", "name": BAD}]}, "messages", "messages[0].name"),
    (CC, {"messages": CHAT, "stop": [BAD]}, "stop", "stop[0]"),
    (CC, {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "description": BAD}}]},
     "tools", "tools[0].function.description"),
    (CC, {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {BAD: {"type": "string"}}}}}},
     "response_format", "response_format.json_schema.schema.properties key"),
    (CC, {"messages": CHAT, "chat_template_kwargs": {"x": BAD}}, "chat_template_kwargs",
     "chat_template_kwargs.x"),
    ("/tokenize", {"prompt": BAD}, "prompt", "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": BAD}]}, "messages", "messages[0].content"),
]


@pytest.mark.parametrize("path,body,param,where", SURROGATES, ids=[s[3] for s in SURROGATES])
async def test_a_lone_surrogate_is_a_400_naming_the_field(client, path, body, param, where):
    err = error_of(await post(client, path, body), 400)
    assert err["param"] == param and err["type"] == "BadRequestError"
    assert err["message"].startswith(f"{where} is not valid UTF-8 text: it holds the lone surrogate "
                                     "'\\ud800'")


async def test_streamed_request_with_a_surrogate_is_refused_before_streaming(client):
    err = error_of(await post(client, C, {"prompt": BAD, "stream": True}), 400)
    assert err["param"] == "prompt"


async def test_python_handle_refuses_a_surrogate_naming_the_argument(sched):
    with pytest.raises(ValueError, match=r"^prompt is not valid UTF-8 text.* at character 2"):
        await sched.generate(BAD, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"^stop\[0\] is not valid UTF-8"):
        await sched.generate("hi", SamplingParams(max_tokens=1, stop=[BAD]))
    with pytest.raises(ValueError, match=r"^bad_words\[0\] is not valid UTF-8"):
        await sched.generate("hi", SamplingParams(max_tokens=1, bad_words=[BAD]))
    assert not sched.open_request_ids


# ---- error bodies hold nothing of the server's insides ---------------------------------
# What Ray puts in an error's text: colour codes, the actor's process, address and id.
RAY_TEXT = ("\x1b[36mray::CoreActor.add_requests()\x1b[39m (pid=48213, ip=10.20.30.40, "
            "actor_id=8f3a1c9e0b7d6a5f4e3d2c1b01000000, repr=<raylm.cluster.core_actor.CoreActor object "
            "at 0x7f3a2b1c0d90>)\n  File \"/opt/raylm/raylm/engine/core.py\", line 90, in add")
INTERNALS = ("\x1b", "pid", "48213", "10.20.30.40", "actor_id", "8f3a1c9e", "0x7f3a", "/opt/raylm", "ray::")


def _ray_task_error(cause: Exception) -> Exception:
    """The exception Ray raises for a remote call that failed: a subclass of the remote
    error's type (so a remote ValueError is a ValueError too) whose text is Ray's."""
    from ray.exceptions import RayTaskError

    return RayTaskError("add_requests", RAY_TEXT, cause, proctitle="ray::CoreActor", pid=48213,
                        ip="10.20.30.40").as_instanceof_cause()


class _FailingBackend:
    """A backend whose engine fails in Ray's words: at once, or after the first output."""

    model_name, max_model_len, max_logprobs = NAME, 64, 5

    def __init__(self, inner, error: Exception, after_first: bool = False):
        self.inner, self.tokenizer, self.error, self.after_first = inner, inner.tokenizer, error, after_first

    async def generate_stream(self, prompt, params, request_id=None):
        if self.after_first:
            async for out in self.inner.generate_stream(prompt, params, request_id):
                yield out
                break
        raise self.error

    async def check_health(self):
        raise self.error

    async def metrics_text(self):
        return b""


def _assert_clean(r: httpx.Response) -> None:
    for leak in INTERNALS:
        assert leak not in r.text, (leak, r.text)


@pytest.mark.parametrize("error", ["runtime_error", "ray_task_error"])
async def test_error_bodies_hold_no_internals(sched, error, caplog):
    # Ray's wrapped remote ValueError is a ValueError too, but the server's failure, not the client's.
    error = RuntimeError(RAY_TEXT) if error == "runtime_error" else _ray_task_error(ValueError("bad"))
    async with _client(create_openai_app(_FailingBackend(sched, error))) as c:
        r = await post(c, C, {"prompt": "x", "max_tokens": 2})
        err = error_of(r, 500)
        assert err["type"] == "InternalServerError" and "error id" in err["message"]
        _assert_clean(r)
        h = await c.get("/health")
        assert h.status_code == 503 and h.json()["error"]["code"] == 503
        _assert_clean(h)
    # the details stay in the server log, under the error id the client was given
    error_id = re.search(r"error id (\w+)", err["message"]).group(1)
    assert any(error_id in rec.getMessage() and "48213" in str(rec.exc_info[1])
               for rec in caplog.records if rec.exc_info)


def test_error_bodies_drop_colour_codes_and_escape_surrogates():
    body = error_body(400, "\x1b[31mtop_p\x1b[0m must be in (0, 1], got 'a\ud800'", "top_p")
    assert body["error"]["message"] == "top_p must be in (0, 1], got 'a\\ud800'"
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # always sendable


async def test_a_stream_that_fails_midway_reports_no_internals(sched):
    backend = _FailingBackend(sched, RuntimeError(RAY_TEXT), after_first=True)
    async with _client(create_openai_app(backend)) as c:
        r = await post(c, C, {"prompt": "x", "max_tokens": 4, "ignore_eos": True, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    assert events[-1]["error"]["code"] == 500 and "error id" in events[-1]["error"]["message"]
    _assert_clean(r)


async def test_a_request_cannot_bring_its_own_chat_template(client):
    kwargs = {"chat_template": "{% for i in range(99999) %}x{% endfor %}"}
    err = error_of(await post(client, CC, {"messages": CHAT, "chat_template_kwargs": kwargs}), 400)
    assert err["param"] == "chat_template_kwargs" and "chat_template is refused" in err["message"]
    err = error_of(await post(client, "/tokenize", {"messages": CHAT, "chat_template_kwargs": kwargs}), 400)
    assert err["param"] == "chat_template_kwargs"


async def test_route_and_method_errors_are_openai_errors(client):
    err = error_of(await client.get("/v1/nowhere"), 404)
    assert err["type"] == "NotFoundError" and err["message"] == "Invalid URL (GET /v1/nowhere)"
    r = await client.get(C)
    err = error_of(r, 405)
    assert r.headers["allow"] == "POST" and "Method Not Allowed" in err["message"]
    r = await client.post(C, content=b"\xff\xfe{", headers={"content-type": "application/json"})
    err = error_of(r, 400)
    assert err["type"] == "BadRequestError"


# ---- one log line per refused request ----------------------------------------------------
async def test_each_refused_request_is_one_log_line_without_traceback(client, caplog):
    refused = [(C, {"prompt": "x", "temperature": "hot"}, 400), (C, {"prompt": "x", "model": "gpt-4"}, 404),
               (C, {"prompt": BAD}, 400), (C, {"prompt": ["x"] * 9}, 400), (CC, {"messages": []}, 400),
               (C, {"prompt": "x", "top_p": 7.0}, 400), (C, {"prompt": [99999]}, 400),
               ("/tokenize", {"prompt": "x", "nope": 1}, 400)]
    with caplog.at_level(logging.INFO, logger="raylm"):
        caplog.clear()
        for path, body, status in refused:
            assert (await post(client, path, body)).status_code == status
        assert (await client.get("/v1/nowhere")).status_code == 404
        assert (await post(client, C, {"prompt": "x", "max_tokens": 1})).status_code == 200
    records = [r for r in caplog.records if r.name == "raylm"]
    assert len(records) == len(refused) + 1, [r.getMessage() for r in records]
    for rec, (path, _, status) in zip(records, refused + [("/v1/nowhere", None, 404)]):
        line = rec.getMessage()
        assert rec.levelno == logging.WARNING and rec.exc_info is None and "\n" not in line
        assert re.match(rf"(POST|GET) {re.escape(path)} -> {status}: \S", line), line


# ---- tokenizing off the event loop --------------------------------------------------------
class _TimedTokenizer:
    """The backend's tokenizer, noting when each encode of a long text ran."""

    def __init__(self, inner):
        self.inner, self.spans = inner, []

    def encode(self, text, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return self.inner.encode(text, *args, **kwargs)
        finally:
            if len(text) > 10_000:
                self.spans.append((t0, time.monotonic()))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


class _TimedBackend:
    def __init__(self, inner):
        self.inner, self.tokenizer = inner, _TimedTokenizer(inner.tokenizer)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_health_answers_while_a_large_prompt_is_tokenized(sched):
    random.seed(0)
    words = ["alpha", "beta", "gamma", "delta", "quick", "brown", "fox", "lazy", "dog"]
    big = " ".join(random.choice(words) for _ in range(150_000))  # ~0.8 MB: ~100k tokens
    backend = _TimedBackend(sched)
    async with _client(create_openai_app(backend)) as c:
        async def timed_health() -> tuple[float, float]:
            t0 = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            return t0, time.monotonic()

        baseline = min(t1 - t0 for t0, t1 in [await timed_health() for _ in range(5)])
        request = asyncio.ensure_future(post(c, C, {"prompt": big, "max_tokens": 1}))
        answered = []
        while not request.done():
            answered.append(await timed_health())
            await asyncio.sleep(0.002)
        err = error_of(await request, 400)  # far longer than max_model_len, once tokenized
    assert "maximum context length is 64 tokens" in err["message"]
    ((start, end),) = backend.tokenizer.spans
    during = [t1 - t0 for t0, t1 in answered if start < t0 and t1 < end]
    # Tokenizing inline would block the loop for all of [start, end]: no /health inside it.
    assert len(during) >= 2, f"/health answered {len(during)} times in {end - start:.2f} s of tokenizing"
    print(f"/health unloaded {baseline * 1e3:.2f} ms; {len(during)} answers during {end - start:.2f} s of "
          f"tokenizing, median {sorted(during)[len(during) // 2] * 1e3:.2f} ms")


# ---- small looseness the fuzzing found ----------------------------------------------------
@pytest.mark.parametrize("key", ["٣", "²", "１", "3a", "-1", ""])
async def test_logit_bias_keys_are_ascii_digits(client, key):
    err = error_of(await post(client, C, {"prompt": "x", "max_tokens": 1, "logit_bias": {key: 1.0}}), 400)
    assert err["param"] == "logit_bias" and repr(key) in err["message"]
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        SamplingParams(logit_bias={key: 1.0})


async def test_logit_bias_ascii_keys_still_work(client, sched):
    r = await post(client, C, {"prompt": "x", "max_tokens": 1, "logit_bias": {" 45 ": 100.0},
                               "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == sched.tokenizer.decode([45])


@pytest.mark.parametrize("calls", [{"id": "c", "type": "function"}, "call_1", 3, ["call_1"]])
async def test_assistant_tool_calls_must_be_a_list_of_objects(client, calls):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "content": "42", "tool_call_id": "c"}]
    for path in (CC, "/tokenize"):
        err = error_of(await post(client, path, {"messages": messages}), 400)
        assert err["param"] == "messages", path
        assert err["message"].startswith("messages[1].tool_calls must be a list of tool call objects, got ")


# ---- the front door's refusals are logged like the routes' ----------------------------------
async def test_front_door_refusals_are_one_log_line_each(sched, caplog):
    from raylm.cluster.drain import Drain
    from raylm.cluster.limits import front_door

    drain = Drain()
    app = front_door(create_openai_app(sched), api_key="k", max_request_body_bytes=2000, drain=drain)
    key = {"Authorization": "Bearer k", "content-type": "application/json"}
    big = json.dumps({"prompt": "x" * 3000}).encode()

    async def chunks():
        for i in range(0, len(big), 500):
            yield big[i:i + 500]

    with caplog.at_level(logging.INFO, logger="raylm"):
        caplog.clear()
        async with _client(app) as c:
            statuses = [(await c.post(C, json={"prompt": "x"})).status_code,  # no key
                        (await c.post(C, content=big, headers=key)).status_code,  # Content-Length too big
                        (await c.post(C, content=chunks(), headers=key)).status_code,  # chunked, too big
                        (await c.post(C, json={"prompt": "x", "top_p": 7.0}, headers=key)).status_code,
                        (await c.post(C, json={"prompt": "x", "max_tokens": 1}, headers=key)).status_code,
                        (await c.get("/health")).status_code]
            drain.draining = True
            statuses.append((await c.post(C, json={"prompt": "x"}, headers=key)).status_code)
        async with _client(create_openai_app(sched, api_key="k")) as c:  # the app's own key check
            statuses.append((await c.get("/v1/models")).status_code)
    assert statuses == [401, 413, 413, 400, 200, 200, 503, 401]
    lines = [r.getMessage() for r in caplog.records if r.name == "raylm"]
    expected = [(C, 401, "invalid or missing API key"), (C, 413, "max_request_body_bytes (2000 bytes) "
                "(Content-Length"), (C, 413, "max_request_body_bytes (2000 bytes)"), (C, 400, "top_p"),
                (C, 503, "shutting down"), ("/v1/models", 401, "invalid or missing API key")]
    assert len(lines) == len(expected), lines
    for line, (path, status, words) in zip(lines, expected):
        assert line.startswith(f"{'GET' if path == '/v1/models' else 'POST'} {path} -> {status}: "), line
        assert words in line, line
    for rec, (_, status, _) in zip([r for r in caplog.records if r.name == "raylm"], expected):
        assert rec.levelno == (logging.ERROR if status >= 500 else logging.WARNING) and rec.exc_info is None
