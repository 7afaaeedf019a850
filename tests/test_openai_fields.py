"""No request field silently ignored: the field table against the installed `openai`
package and README.md, refused and unknown fields (400 naming them, the server keeps
serving), fields without effect, best_of / modalities / logit_bias / allowed_token_ids /
bad_words checks, chat echo, /tokenize and /detokenize, and routes we do not serve."""
from __future__ import annotations

import json
import os

import pytest

from raylm.cluster import field_table
from raylm.cluster.field_table import NO_EFFECT, REFUSED, SUPPORTED
from raylm.cluster.local import LocalCluster
from raylm.cluster.openai_api import create_openai_app
from raylm.cluster.protocol import ChatCompletionRequest, CompletionRequest
from raylm.engine.config import EngineArgs
from tests.test_openai_api import _client

pytestmark = pytest.mark.anyio
C, CC = "/v1/completions", "/v1/chat/completions"
CHAT = [{"role": "user", "content": "The quick brown fox"}]
GOOD = {C: dict(prompt="The quick brown", max_tokens=4, temperature=0, ignore_eos=True),
        CC: dict(messages=CHAT, max_tokens=4, temperature=0, ignore_eos=True)}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def sched(llama_dir):
    s = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=96, block_size=8,
                                max_num_seqs=8, max_logprobs=5), served_model_name="tiny")
    yield s
    await s.shutdown()


@pytest.fixture(scope="module")
async def client(sched):
    async with _client(create_openai_app(sched, api_key="k")) as c:
        c.headers["Authorization"] = "Bearer k"
        yield c


def _error(r, status: int, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err["message"]


# ---- the table -----------------------------------------------------------------------------
def _openai_fields(module) -> set[str]:
    # The streaming variant's annotations hold every field of the base, plus `stream`.
    return set(module.CompletionCreateParamsStreaming.__annotations__)


def test_field_table_classifies_every_openai_field():
    """Fails when the openai package adds (or drops) a request field we have not classified."""
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    for route, module, model in (("chat", chat, ChatCompletionRequest),
                                 ("completions", completions, CompletionRequest)):
        openai_table, vllm_table = field_table.TABLES[route]
        assert set(openai_table) == _openai_fields(module), route
        assert not set(openai_table) & set(vllm_table), route
        for table in (openai_table, vllm_table):
            for name, (status, note) in table.items():
                assert status in (SUPPORTED, NO_EFFECT, REFUSED)
                # a supported field is parsed by the request model; the others are not
                assert (name in model.model_fields) == (status == SUPPORTED), (route, name)
        assert set(model.model_fields) <= set(openai_table) | set(vllm_table), route


def test_readme_shows_the_field_table():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    assert field_table.markdown() in readme


# ---- refused, unknown and no-effect fields ------------------------------------------------------
REFUSED_FIELDS = [(path, name) for path, route in ((CC, "chat"), (C, "completions"))
                  for table in field_table.TABLES[route] for name, (status, _) in table.items()
                  if status == REFUSED]


@pytest.mark.parametrize("path,name", REFUSED_FIELDS)
async def test_refused_fields_are_400_and_the_server_keeps_serving(client, path, name):
    message = _error(await client.post(path, json={**GOOD[path], name: {"x": 1}}), 400, name)
    assert message.startswith(f"{name} is not supported")
    assert (await client.post(path, json={**GOOD[path], name: None})).status_code == 200  # null: unset


@pytest.mark.parametrize("path", [C, CC])
async def test_unknown_fields_are_400(client, path):
    for name in ("foo", "guided_decoding_backend", "logit_biases"):
        message = _error(await client.post(path, json={**GOOD[path], name: 1}), 400, name)
        assert message == f"Unrecognized request argument supplied: {name}"
    # a chat-only field is unknown on /v1/completions
    if path == C:
        _error(await client.post(path, json={**GOOD[path], "metadata": {"a": "b"}}), 400, "metadata")


async def test_no_effect_fields_change_nothing(client):
    for path, route in ((CC, "chat"), (C, "completions")):
        base = (await client.post(path, json=GOOD[path])).json()["choices"][0]
        values = {"metadata": {"a": "b"}, "prediction": {"type": "content", "content": "x"},
                  "prompt_cache_key": "k", "prompt_cache_options": {"mode": "implicit"},
                  "prompt_cache_retention": "24h", "safety_identifier": "s", "service_tier": "auto",
                  "store": False, "user": "u"}
        extra = {k: v for k, v in values.items() if field_table.status_of(route, k) == NO_EFFECT}
        assert extra, route
        r = await client.post(path, json={**GOOD[path], **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0] == base


# ---- fields with limits --------------------------------------------------------------------------
async def test_best_of_modalities_and_token_id_fields(client, sched):
    vocab = len(sched.tokenizer)
    assert (await client.post(C, json={**GOOD[C], "n": 2, "best_of": 2, "temperature": 1})).status_code == 200
    assert "best_of must equal n (1)" in _error(await client.post(C, json={**GOOD[C], "best_of": 3}), 400, "best_of")
    assert (await client.post(CC, json={**GOOD[CC], "modalities": ["text"]})).status_code == 200
    assert "audio" in _error(await client.post(CC, json={**GOOD[CC], "modalities": ["text", "audio"]}), 400,
                             "modalities")
    for path in (C, CC):
        msg = _error(await client.post(path, json={**GOOD[path], "logit_bias": {str(vocab): 5}}), 400, "logit_bias")
        assert f"logit_bias token id {vocab} is outside the vocabulary [0, {vocab})" == msg
        if path == C:  # a prompt of token ids: the 400 names the prompt
            msg = _error(await client.post(C, json={**GOOD[C], "prompt": [5, vocab]}), 400, "prompt")
            assert msg == f"prompt token id {vocab} is outside the vocabulary [0, {vocab})"
        _error(await client.post(path, json={**GOOD[path], "logit_bias": {"abc": 5}}), 400, "logit_bias")
        assert "100" in _error(await client.post(path, json={**GOOD[path], "logit_bias": {"5": 150}}), 400,
                               "logit_bias")
        _error(await client.post(path, json={**GOOD[path], "allowed_token_ids": [vocab + 3]}), 400,
               "allowed_token_ids")
        _error(await client.post(path, json={**GOOD[path], "bad_words": [" "]}), 400, "bad_words")
        r = await client.post(path, json={**GOOD[path], "logit_bias": {"5": -100}, "bad_words": ["zzz"],
                                          "allowed_token_ids": list(range(vocab))})
        assert r.status_code == 200, r.text


async def test_chat_echo_prepends_the_continued_message(client):
    msgs = CHAT + [{"role": "assistant", "content": "It jumps"}]
    base = dict(messages=msgs, max_tokens=4, temperature=0, ignore_eos=True, continue_final_message=True,
                add_generation_prompt=False)
    plain = (await client.post(CC, json=base)).json()["choices"][0]["message"]["content"]
    echoed = (await client.post(CC, json={**base, "echo": True})).json()["choices"][0]["message"]["content"]
    assert echoed == "It jumps" + plain
    r = await client.post(CC, json={**base, "echo": True, "stream": True})
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in r.text.split("\n\n") if line.startswith("data: {"))
    assert text == echoed
    # the reply's role is the assistant's and the last message is the user's: nothing to echo
    assert (await client.post(CC, json={**GOOD[CC], "echo": True})).json()["choices"][0]["message"]["content"] \
        == (await client.post(CC, json=GOOD[CC])).json()["choices"][0]["message"]["content"]


# ---- /tokenize, /detokenize and routes we do not serve ------------------------------------------------
async def test_tokenize_and_detokenize(client, sched):
    tok = sched.tokenizer
    r = await client.post("/tokenize", json={"model": "tiny", "prompt": "héllo wörld"})
    assert r.status_code == 200, r.text
    ids = tok.encode("héllo wörld")
    assert r.json() == {"count": len(ids), "max_model_len": 96, "tokens": ids, "token_strs": None}
    r = await client.post("/tokenize", json={"messages": CHAT, "return_token_strs": True})
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tok.encode(text, add_special_tokens=False)
    assert r.json()["tokens"] == chat_ids and r.json()["token_strs"] == tok.convert_ids_to_tokens(chat_ids)
    r = await client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
    assert r.json()["count"] == len(tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=False,
                                                                       tokenize=False), add_special_tokens=False))
    assert (await client.post("/detokenize", json={"model": "tiny", "tokens": ids})).json() == {
        "prompt": tok.decode(ids)}
    _error(await client.post("/detokenize", json={"tokens": [len(tok)]}), 400, "tokens")
    _error(await client.post("/tokenize", json={"prompt": "x", "messages": CHAT}), 400, "prompt")
    _error(await client.post("/tokenize", json={"prompt": "x", "foo": 1}), 400, "foo")
    _error(await client.post("/tokenize", json={"prompt": "x", "model": "gpt-4"}), 404, "model")
    # behind the API key, like /v1
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        r = await client.post(path, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


async def test_embeddings_and_responses_are_404(client):
    for path in ("/v1/embeddings", "/v1/responses"):
        r = await client.post(path, json={"model": "tiny", "input": "x"})
        assert r.status_code == 404
        assert r.json()["error"] == {"message": f"Invalid URL (POST {path})", "type": "NotFoundError",
                                     "param": None, "code": 404}
