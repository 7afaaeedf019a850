"""The OpenAI-compatible HTTP API over the in-process cluster (LocalCluster): both generation
routes (JSON and SSE), logprobs in both formats, every bad input with its status and
OpenAI error body, bearer auth, the side routes, and client disconnects that abort."""
from __future__ import annotations

import asyncio
import time
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raylm import SamplingParams
from raylm.cluster.local import LocalCluster
from raylm.cluster.openai_api import create_openai_app
from raylm.cluster.protocol import ChatCompletionRequest, CompletionRequest
from raylm.engine.config import EngineArgs
from tests.helpers import hf_greedy, hf_prompt_logprobs

pytestmark = pytest.mark.anyio

MAX_MODEL_LEN = 96
NAME = "tiny-llama"
CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"  # one event loop for the module, so the backend fixture can be shared


@pytest.fixture(scope="module")
async def sched(llama_dir):
    s = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
                                   block_size=8, max_num_seqs=16, max_logprobs=5),
                        served_model_name=NAME)
    yield s
    await s.shutdown()


async def await_until(cond, timeout=30.0):
    """Poll cond() until true (the cores act in their own threads); generous deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


@pytest.fixture(scope="module")
async def client(sched):
    async with _client(create_openai_app(sched, max_n=4)) as c:
        yield c


async def post(client, path, **body):
    return await client.post(path, json=body)


def events(response) -> list[dict]:
    """The JSON events of an SSE body, checking its framing and the final [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def streamed_texts(chunks: list[dict], key: str) -> dict[int, str]:
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch["choices"]:
            piece = c["text"] if key == "text" else c["delta"].get("content", "")
            texts[c["index"]] = texts.get(c["index"], "") + piece
    return texts


def finishes(chunks: list[dict]) -> dict[int, str]:
    out = {}
    for ch in chunks:
        for c in ch["choices"]:
            if c["finish_reason"] is not None:
                assert c["index"] not in out, "a choice finished twice"
                out[c["index"]] = c["finish_reason"]
    return out


def metric(text: str, name: str, **labels) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- request models alone -------------------------------------------------------------
def test_request_models_convert_to_sampling_params():
    req = CompletionRequest.model_validate({"prompt": "x", "echo": True, "logprobs": 2, "top_k": -1,
                                            "stop": "a", "unknown_field": 1})
    sp = req.to_sampling_params(7)
    assert (sp.max_tokens, sp.logprobs, sp.prompt_logprobs, sp.top_k, sp.stop) == (7, 2, 2, 0, ["a"])
    assert sp.temperature == 1.0  # unset fields keep SamplingParams' defaults
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "logprobs": True, "top_logprobs": 3,
        "max_tokens": 5, "max_completion_tokens": 9, "temperature": 0})
    assert chat.conversation() == [{"role": "user", "content": "a\nb"}]
    assert chat.requested_max_tokens() == 9 and chat.max_tokens_field == "max_completion_tokens"
    sp = chat.to_sampling_params(9)
    assert (sp.logprobs, sp.is_greedy) == (3, True)
    assert ChatCompletionRequest.model_validate({"messages": CHAT}).to_sampling_params(4).logprobs is None


# ---- completions ------------------------------------------------------------------------
async def test_completion_matches_backend_and_counts_usage(client, sched):
    tok = sched.tokenizer
    r = await post(client, "/v1/completions", model=NAME, prompt="The quick brown", max_tokens=8,
                   temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == NAME
    ids = tok.encode("The quick brown")
    ref = await sched.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8,
                                                                         ignore_eos=True))
    (choice,) = body["choices"]
    assert choice["text"] == ref.outputs[0].text and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}
    # no max_tokens: 16, as in vLLM and OpenAI; null: the rest of the context
    r = await post(client, "/v1/completions", prompt=ids, temperature=0, ignore_eos=True)
    assert r.json()["usage"]["completion_tokens"] == 16
    r = await post(client, "/v1/completions", prompt=ids, temperature=0, ignore_eos=True, max_tokens=None)
    assert r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(ids)


async def test_streaming_equals_non_streaming_with_stop_strings(client):
    base = dict(prompt="Paged attention keeps", max_tokens=16, temperature=0, ignore_eos=True)
    full = (await post(client, "/v1/completions", **base)).json()["choices"][0]["text"]
    assert len(full) >= 8
    for extra in ({}, {"stop": [full[4:7]]}, {"stop": full[5:7], "include_stop_str_in_output": True}):
        whole = (await post(client, "/v1/completions", **base, **extra)).json()
        chunks = events(await post(client, "/v1/completions", **base, **extra, stream=True,
                                   stream_options={"include_usage": True}))
        assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)
        assert streamed_texts(chunks, "text") == {0: whole["choices"][0]["text"]}
        assert finishes(chunks) == {0: whole["choices"][0]["finish_reason"]}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        if extra:
            assert whole["choices"][0]["finish_reason"] == "stop"
            assert whole["choices"][0]["stop_reason"] == (extra["stop"][0] if isinstance(extra["stop"], list)
                                                          else extra["stop"])
    # without include_usage there is no usage chunk
    chunks = events(await post(client, "/v1/completions", **base, stream=True))
    assert all(ch["choices"] for ch in chunks)


async def test_batch_of_prompts_with_n(client):
    body = dict(prompt=["Once upon a time", "1 2 3 4"], n=2, max_tokens=5, temperature=1.0, seed=3,
                ignore_eos=True)
    whole = (await post(client, "/v1/completions", **body)).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert whole["usage"]["completion_tokens"] == 4 * 5
    chunks = events(await post(client, "/v1/completions", **body, stream=True))
    assert streamed_texts(chunks, "text") == {c["index"]: c["text"] for c in whole["choices"]}
    assert finishes(chunks) == {i: "length" for i in range(4)}


async def test_stop_token_ids(client, sched):
    base = dict(prompt="Continuous batching", max_tokens=10, temperature=0, ignore_eos=True)
    ref = await sched.generate({"prompt_token_ids": sched.tokenizer.encode(base["prompt"])},
                               SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stop_id = ref.outputs[0].token_ids[3]
    choice = (await post(client, "/v1/completions", **base, stop_token_ids=[stop_id])).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id


async def test_completion_logprobs_and_echo_match_transformers(client, sched, llama_dir):
    prompt = "Once upon a time"
    ids = sched.tokenizer.encode(prompt)
    ref_ids, ref_lps = hf_greedy(llama_dir, ids, 6)
    ref_prompt_lps = hf_prompt_logprobs(llama_dir, ids)
    body = (await post(client, "/v1/completions", prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True,
                       logprobs=2)).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert lp["token_logprobs"] == pytest.approx(ref_lps, abs=2e-3)
    assert all(len(top) <= 3 and max(top.values()) >= lp_ - 1e-6  # top-2 plus the chosen token
               for top, lp_ in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert "".join(lp["tokens"]) == body["choices"][0]["text"] == sched.tokenizer.decode(ref_ids)

    echo = (await post(client, "/v1/completions", prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True,
                       logprobs=1, echo=True)).json()["choices"][0]
    assert echo["text"] == prompt + body["choices"][0]["text"]
    lp = echo["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 6 and "".join(lp["tokens"][:len(ids)]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(ref_prompt_lps, abs=2e-3)
    assert lp["token_logprobs"][len(ids):] == pytest.approx(ref_lps, abs=2e-3)
    assert echo["prompt_logprobs"][0] is None and len(echo["prompt_logprobs"]) == len(ids)
    # streamed echo: the prompt (and its logprobs) lead the first chunk
    chunks = events(await post(client, "/v1/completions", prompt=prompt, max_tokens=6, temperature=0,
                               ignore_eos=True, logprobs=1, echo=True, stream=True))
    assert streamed_texts(chunks, "text") == {0: echo["text"]}
    streamed = [x for ch in chunks for x in ch["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-6)


async def test_token_id_prompts(client, sched):
    tok = sched.tokenizer
    a, b = tok.encode("The quick"), tok.encode("lazy dog")
    common = dict(max_tokens=4, temperature=0, ignore_eos=True)
    by_text = (await post(client, "/v1/completions", prompt=["The quick", "lazy dog"], **common)).json()
    by_ids = (await post(client, "/v1/completions", prompt=[a, b], **common)).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert by_ids["usage"] == by_text["usage"]
    one = (await post(client, "/v1/completions", prompt=a, echo=True, **common)).json()
    assert one["choices"][0]["text"] == "The quick" + by_text["choices"][0]["text"]


async def test_vllm_extra_fields_are_accepted(client):
    body = dict(prompt="héllo wörld", max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, min_p=0.01,
                repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.2, min_tokens=2,
                stop_token_ids=[1], skip_special_tokens=False, spaces_between_special_tokens=False,
                include_stop_str_in_output=False, ignore_eos=True, prompt_logprobs=1, seed=11, user="u1",
                best_of=None, suffix=None)
    first = await post(client, "/v1/completions", **body)
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) > 1
    again = (await post(client, "/v1/completions", **body)).json()["choices"][0]
    assert again["text"] == choice["text"]  # seeded
    nulls = await post(client, "/v1/completions", prompt="x", max_tokens=2, temperature=None, n=None, stop=None)
    assert nulls.status_code == 200, nulls.text
    unknown = await post(client, "/v1/completions", **body, some_future_field={"x": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "some_future_field"
    assert unknown.json()["error"]["message"] == "Unrecognized request argument supplied: some_future_field"


# ---- chat ---------------------------------------------------------------------------------
async def test_chat_applies_template_and_streams_the_same_text(client, sched):
    tok = sched.tokenizer
    base = dict(messages=CHAT, max_completion_tokens=8, temperature=0, ignore_eos=True)
    whole = (await post(client, "/v1/chat/completions", **base)).json()
    assert whole["id"].startswith("chatcmpl-") and whole["object"] == "chat.completion"
    (choice,) = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    ref = await sched.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8,
                                                                         ignore_eos=True))
    assert choice["message"]["content"] == ref.outputs[0].text
    assert whole["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}

    chunks = events(await post(client, "/v1/chat/completions", **base, stream=True,
                               stream_options={"include_usage": True}))
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_texts(chunks, "delta") == {0: choice["message"]["content"]}
    assert finishes(chunks) == {0: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    # max_tokens (the older name) and n=2 both work; n=2 streams a role chunk per choice
    two = events(await post(client, "/v1/chat/completions", messages=CHAT, max_tokens=3, n=2, temperature=0,
                            ignore_eos=True, stream=True))
    roles = [c["index"] for ch in two for c in ch["choices"] if c["delta"].get("role")]
    assert roles == [0, 1] and finishes(two) == {0: "length", 1: "length"}
    # continue_final_message: no generation prompt, the last message is continued
    cont = await post(client, "/v1/chat/completions", messages=CHAT + [{"role": "assistant", "content": "ju"}],
                      continue_final_message=True, add_generation_prompt=False, max_tokens=2)
    assert cont.status_code == 200, cont.text


async def test_chat_logprobs(client):
    body = (await post(client, "/v1/chat/completions", messages=CHAT, max_tokens=5, temperature=0,
                       ignore_eos=True, logprobs=True, top_logprobs=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode("utf-8"))
        tops = item["top_logprobs"]
        assert len(tops) == 2 and tops[0]["logprob"] >= tops[1]["logprob"]
        assert tops[0]["logprob"] == pytest.approx(item["logprob"])  # greedy picks the top token
    plain = (await post(client, "/v1/chat/completions", messages=CHAT, max_tokens=2, logprobs=True)).json()
    assert all(i["top_logprobs"] == [] for i in plain["choices"][0]["logprobs"]["content"])
    chunks = events(await post(client, "/v1/chat/completions", messages=CHAT, max_tokens=5, temperature=0,
                               ignore_eos=True, logprobs=True, top_logprobs=2, stream=True))
    streamed = [i for ch in chunks for c in ch["choices"] if c["logprobs"] for i in c["logprobs"]["content"]]
    assert streamed == content


# ---- errors ---------------------------------------------------------------------------------
LONG = list(range(5, 5 + 100))  # more tokens than MAX_MODEL_LEN
C, CC = "/v1/completions", "/v1/chat/completions"
BAD = [
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    (C, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "integer"),
    (C, {"prompt": "x", "n": True}, 400, "n", "integer"),
    (C, {"prompt": {"a": 1}}, 400, "prompt", "prompt must be one of"),
    (C, {"max_tokens": 3}, 400, "prompt", "Field required"),
    (CC, {"messages": "hi"}, 400, "messages", "messages"),
    (CC, {"messages": [{"content": "hi"}]}, 400, "messages", "role"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist."),
    (CC, {"messages": CHAT, "model": "gpt-4"}, 404, "model", "does not exist"),
    (C, {"prompt": LONG}, 400, "prompt", "maximum context length is 96 tokens. However, your request has 100"),
    (C, {"prompt": LONG[:90], "max_tokens": 10}, 400, "max_tokens",
     "However, you requested 100 tokens (90 in the messages, 10 in the completion)"),
    (CC, {"messages": CHAT, "max_completion_tokens": 500}, 400, "max_completion_tokens", "in the completion"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    (C, {"prompt": "x", "n": 5}, 400, "n", "n must be <= 4, got 5"),
    (C, {"prompt": "x", "n": 0}, 400, "n", "n must be >= 1"),
    (C, {"prompt": "x", "logprobs": -1}, 400, "logprobs", ">= 0"),
    (C, {"prompt": "x", "logprobs": 50}, 400, "logprobs", "max_logprobs"),
    (C, {"prompt": "x", "prompt_logprobs": 50}, 400, "prompt_logprobs", "max_logprobs"),
    (CC, {"messages": CHAT, "top_logprobs": -1, "logprobs": True}, 400, "top_logprobs", ">= 0"),
    (CC, {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    (CC, {"messages": CHAT, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs", "max_logprobs"),
    (C, {"prompt": "x", "top_p": 5.0}, 400, "top_p", "top_p must be in (0, 1]"),
    (CC, {"messages": CHAT, "temperature": -1.0}, 400, "temperature", "temperature must be >= 0"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    (C, {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens", "min_tokens"),
    (C, {"prompt": ""}, 400, "prompt", "empty"),
    (C, {"prompt": []}, 400, "prompt", "empty"),
    (C, {"prompt": [99999]}, 400, "prompt", "prompt token id 99999"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    (C, {"prompt": "x", "stream": True, "prompt_logprobs": 1}, 400, "prompt_logprobs", "stream"),
    (CC, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", "image_url"),
    (CC, {"messages": CHAT, "continue_final_message": True, "add_generation_prompt": True}, 400,
     "continue_final_message", "add_generation_prompt"),
    (CC, {"messages": []}, 400, "messages", "empty"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD,
                         ids=[f"{i}-{b[2]}-{b[3]}" for i, b in enumerate(BAD)])
async def test_bad_requests_get_openai_errors(client, path, body, status, param, fragment):
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert fragment in err["message"]


async def test_malformed_bodies(client):
    for content in (b"{not json", b"[1, 2]", b""):
        r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["type"] == "BadRequestError"
    r = await client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


async def test_bad_requests_do_not_disturb_good_ones(client, sched):
    good = dict(prompt="The lazy dog", max_tokens=6, temperature=0, ignore_eos=True)
    alone = (await post(client, "/v1/completions", **good)).json()["choices"][0]["text"]
    results = await asyncio.gather(
        post(client, "/v1/completions", **good), post(client, "/v1/completions", prompt=[99999]),
        post(client, "/v1/completions", prompt="x", top_p=7.0), post(client, "/v1/completions", prompt=LONG),
        post(client, "/v1/completions", **good, stream=True), post(client, "/v1/completions", **good))
    assert [r.status_code for r in results] == [200, 400, 400, 400, 200, 200]
    assert results[0].json()["choices"][0]["text"] == alone == results[5].json()["choices"][0]["text"]
    assert streamed_texts(events(results[4]), "text") == {0: alone}
    assert not sched.open_request_ids
    await await_until(lambda: sched.stats()["blocks_in_use"] == 0)


class _BrokenBackend:
    """A backend whose engine has died."""

    model_name, max_model_len = "broken", 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    async def generate_stream(self, prompt, params, request_id=None):
        raise RuntimeError("worker group 0 failed")
        yield  # an async generator, like the real ones

    async def check_health(self):
        raise RuntimeError("worker group 0 failed")

    async def metrics_text(self):
        return b""


async def test_engine_failure_is_500_and_unhealthy(sched, caplog):
    async with _client(create_openai_app(_BrokenBackend(sched.tokenizer))) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
        message = r.json()["error"]["message"]  # the cause stays in the server log, under the error id
        assert "worker group 0 failed" not in message and "error id" in message
        error_id = message.split("error id ")[1].split(")")[0]
        assert any(error_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
        assert (await c.get("/health")).status_code == 503


class _LimitedBackend:
    """The scheduler behind a front that knows max_logprobs (as the Serve ingress's does)."""

    max_logprobs = 3

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_logprob_limit_checked_before_the_backend(sched):
    async with _client(create_openai_app(_LimitedBackend(sched))) as c:
        r = await c.post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True, "top_logprobs": 4})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "top_logprobs"
        assert err["message"] == "top_logprobs must be <= 3 (the server's max_logprobs), got 4"
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "logprobs": 3})
        assert r.status_code == 200, r.text


# ---- auth and side routes ---------------------------------------------------------------------
async def test_bearer_auth(sched):
    async with _client(create_openai_app(sched, api_key="sekret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "AuthenticationError" and r.json()["error"]["code"] == 401
        assert (await c.get("/v1/models")).status_code == 401
        # a malformed body is still refused for auth first
        r = await c.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
        assert r.status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=ok)
        assert r.status_code == 200, r.text
        assert (await c.get("/health")).status_code == 200 and (await c.get("/metrics")).status_code == 200


async def test_models_health_metrics_version(client, sched):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == NAME and card["object"] == "model" and card["max_model_len"] == MAX_MODEL_LEN
    assert (await client.get("/health")).status_code == 200
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {fam.name for fam in text_string_to_metric_families(r.text)}
    assert "raylm:num_requests_running" in names and "raylm:request_success" in names
    assert metric(r.text, "raylm:request_success_total", finished_reason="length") > 0
    assert (await client.get("/version")).json()["version"]
    assert "/v1/chat/completions" in (await client.get("/openapi.json")).json()["paths"]


# ---- client disconnects ---------------------------------------------------------------------
async def _asgi_request(app, path: str, body: dict, gone: asyncio.Event, sent: list) -> None:
    """Serve one request the way an ASGI server does; the client leaves when `gone` is set."""
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1234), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 30)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_and_frees_blocks(sched, stream):
    app = create_openai_app(sched)
    before = metric((await sched.metrics_text()).decode(), "raylm:request_success_total", finished_reason="abort")
    gone, sent = asyncio.Event(), []
    body = dict(prompt="Once upon a time", max_tokens=80, temperature=0, ignore_eos=True, stream=stream)

    async def leave():
        if stream:  # after the first content chunk
            while not any(m["type"] == "http.response.body" and m.get("body") for m in sent):
                await asyncio.sleep(0.001)
        else:  # as soon as the backend runs the request
            while not sched.open_request_ids:
                await asyncio.sleep(0.001)
        gone.set()

    await asyncio.gather(_asgi_request(app, "/v1/completions", body, gone, sent), leave())
    assert not sched.open_request_ids

    # The abort reaches the core's thread asynchronously: wait for it to be counted.
    deadline = time.monotonic() + 30
    while metric((await sched.metrics_text()).decode(), "raylm:request_success_total",
                 finished_reason="abort") < before + 1:
        assert time.monotonic() < deadline, "the abort was never counted"
        await asyncio.sleep(0.01)
    stats = sched.stats()
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == stats["blocks_in_use"] == 0
    after = metric((await sched.metrics_text()).decode(), "raylm:request_success_total", finished_reason="abort")
    assert after == before + 1
    if stream:
        text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert b'"finish_reason": "length"' not in text


# ---- the real model, through the openai client ------------------------------------------------------
@pytest.fixture(scope="module")
async def smol():
    s = LocalCluster(EngineArgs(model=None, dtype="float32", max_model_len=256, max_num_seqs=4))
    yield s
    await s.shutdown()


async def test_openai_client_chat_with_smollm2(smol):
    import openai

    app = create_openai_app(smol, api_key="k")
    async with _client(app) as http:
        oa = openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=http)
        (model,) = (await oa.models.list()).data
        question = [{"role": "user", "content": "What is the capital of France?"}]
        resp = await oa.chat.completions.create(model=model.id, messages=question, temperature=0, max_tokens=24)
        answer = resp.choices[0].message.content
        assert "Paris" in answer and resp.id.startswith("chatcmpl-")
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        stream = await oa.chat.completions.create(model=model.id, messages=question, temperature=0, max_tokens=24,
                                                  stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == answer and usage.total_tokens == resp.usage.total_tokens
        comp = await oa.completions.create(model=model.id, prompt="The capital of France is", max_tokens=4,
                                           temperature=0, logprobs=2)
        assert len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens
        with pytest.raises(openai.BadRequestError) as err:
            await oa.chat.completions.create(model=model.id, messages=question, max_tokens=10_000)
        assert "maximum context length" in str(err.value)
        with pytest.raises(openai.NotFoundError):
            await oa.chat.completions.create(model="gpt-4", messages=question)


def test_streams_yield_the_newest_output_when_writing_lags():
    """Cumulative outputs queued while the response is written are collapsed to each
    prompt's newest: fewer chunks, the same last output, every stream ends."""
    from raylm.cluster.openai_api import _Streams

    class Out:
        def __init__(self, n, finished):
            self.n, self.finished = n, finished

    class Backend:
        async def generate_stream(self, prompt, params, request_id=None):
            for n in range(1, 41):
                await asyncio.sleep(0)
                yield Out(n, n == 40)

    async def main():
        streams = _Streams(Backend(), [({}, None, "a"), ({}, None, "b")])
        await streams.start()
        seen = {0: [], 1: []}
        async for i, out in streams.outputs():
            seen[i].append(out.n)
            await asyncio.sleep(0.01)  # a slow writer
        await streams.close()
        return seen

    seen = asyncio.run(main())
    for ns in seen.values():
        assert ns[-1] == 40 and ns == sorted(ns) and len(ns) < 40
