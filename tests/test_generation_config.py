"""Sampling defaults from a model's generation_config.json, as vLLM takes them
(`--generation-config auto`, its default): a request that leaves a field out gets the
model's value, one that sets it keeps its own; `generation_config="vllm"` ignores the
file. Checked on /v1/completions, /v1/chat/completions, gRPC and the offline LLM over a
random model whose generation_config.json asks for greedy decoding."""
from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from raylm import SamplingParams
from raylm.cluster.grpc_client import build_request
from raylm.cluster.grpc_service import GenerateServicer, request_to_inputs
from raylm.cluster.local import LocalCluster
from raylm.cluster.openai_api import create_openai_app
from raylm.cluster.protocol import ChatCompletionRequest, CompletionRequest
from raylm.engine.config import EngineArgs
from raylm.engine.llm import LLM
from raylm.engine.model_config import ModelConfig

pytestmark = pytest.mark.anyio

MAX_MODEL_LEN = 48
# Greedy, a repetition penalty and a length: each changes what a request gets.
GENERATION = {"temperature": 0.0, "repetition_penalty": 1.3, "max_new_tokens": 6,
              "eos_token_id": 1, "do_sample": False}
DEFAULTS = {"temperature": 0.0, "repetition_penalty": 1.3, "max_tokens": 6}
EXPLICIT = {"temperature": 0.0, "repetition_penalty": 1.3}
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


def _model_dir(src: str, dst: str, generation) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "generation_config.json")
    if os.path.exists(path):
        os.remove(path)
    if generation is not None:
        with open(path, "w") as f:
            json.dump(generation, f)
    return dst


@pytest.fixture(scope="module")
def greedy_dir(llama_dir, tmp_path_factory):
    return _model_dir(llama_dir, str(tmp_path_factory.mktemp("gen") / "greedy"), GENERATION)


@pytest.fixture(scope="module")
def plain_dir(llama_dir, tmp_path_factory):
    return _model_dir(llama_dir, str(tmp_path_factory.mktemp("gen") / "plain"), None)


def _args(model: str, **kw) -> EngineArgs:
    return EngineArgs(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=8,
                      max_num_seqs=8, **kw)


@pytest.fixture(scope="module")
async def greedy(greedy_dir):
    cluster = LocalCluster(_args(greedy_dir), served_model_name="m")
    yield cluster
    await cluster.shutdown()


@pytest.fixture(scope="module")
async def ignoring(greedy_dir):
    """The same model under generation_config="vllm": SamplingParams' own defaults."""
    cluster = LocalCluster(_args(greedy_dir, generation_config="vllm"), served_model_name="m")
    yield cluster
    await cluster.shutdown()


def _client(backend) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_openai_app(backend)),
                             base_url="http://test", timeout=120)


async def _post(backend, path: str, **body) -> dict:
    async with _client(backend) as c:
        r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---- where the defaults come from -------------------------------------------------------
def test_engine_arg_and_model_config(greedy_dir, plain_dir):
    assert EngineArgs().generation_config == "auto"
    with pytest.raises(ValueError, match="generation_config must be 'auto', 'vllm' or a folder"):
        EngineArgs(generation_config="/no/such/folder")
    assert ModelConfig.from_args(_args(greedy_dir)).default_sampling == DEFAULTS
    assert ModelConfig.from_args(_args(greedy_dir, generation_config="vllm")).default_sampling == {}
    assert ModelConfig.from_args(_args(plain_dir)).default_sampling == {}
    # a folder: its generation_config.json, whatever the model's own
    assert ModelConfig.from_args(_args(plain_dir, generation_config=greedy_dir)).default_sampling == DEFAULTS


def test_request_fields_win_over_the_defaults():
    sp = CompletionRequest.model_validate({"prompt": "x"}).to_sampling_params(6, DEFAULTS)
    assert (sp.temperature, sp.repetition_penalty, sp.max_tokens) == (0.0, 1.3, 6)
    sp = CompletionRequest.model_validate({"prompt": "x", "temperature": 0.8, "repetition_penalty": 1.0}
                                          ).to_sampling_params(6, DEFAULTS)
    assert (sp.temperature, sp.repetition_penalty) == (0.8, 1.0)
    chat = ChatCompletionRequest.model_validate({"messages": CHAT, "top_p": 0.5})
    sp = chat.to_sampling_params(4, {"top_p": 0.9, "top_k": 20, "min_p": 0.1})
    assert (sp.top_p, sp.top_k, sp.min_p) == (0.5, 20, 0.1)
    # gRPC: unset optional fields take the defaults; set ones (top_k 0 included) win
    _, sp = request_to_inputs(build_request("hi"), {**DEFAULTS, "top_k": 20, "min_p": 0.1})
    assert (sp.temperature, sp.repetition_penalty, sp.max_tokens) == (0.0, 1.3, 6)
    assert (sp.top_k, sp.min_p) == (20, 0.1)
    _, sp = request_to_inputs(build_request("hi", temperature=0.7, max_tokens=3, top_k=0, min_p=0.0),
                              {**DEFAULTS, "top_k": 20, "min_p": 0.1})
    assert (sp.temperature, sp.max_tokens, sp.top_k, sp.min_p) == (0.7, 3, 0, 0.0)
    _, sp = request_to_inputs(build_request("hi"))
    assert sp.to_dict() == SamplingParams().to_dict()


# ---- HTTP --------------------------------------------------------------------------------
async def test_completions_default_to_the_models_greedy_decoding(greedy):
    implicit = await _post(greedy, "/v1/completions", prompt=PROMPT, max_tokens=6, n=2)
    explicit = await _post(greedy, "/v1/completions", prompt=PROMPT, max_tokens=6, **EXPLICIT)
    texts = {c["text"] for c in implicit["choices"]}
    assert texts == {explicit["choices"][0]["text"]}  # greedy: both choices the same
    # max_tokens null: the model's max_new_tokens (6), not the rest of the context
    out = await _post(greedy, "/v1/completions", prompt=PROMPT, max_tokens=None, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 6


async def test_chat_defaults_and_a_request_that_sets_the_fields(greedy, ignoring):
    implicit = await _post(greedy, "/v1/chat/completions", messages=CHAT, ignore_eos=True)
    explicit = await _post(greedy, "/v1/chat/completions", messages=CHAT, ignore_eos=True, max_tokens=6,
                           **EXPLICIT)
    assert implicit["usage"]["completion_tokens"] == 6
    assert implicit["choices"][0]["message"] == explicit["choices"][0]["message"]
    # Set fields win: a sampled request equals the same request where the file is ignored.
    sampled = dict(messages=CHAT, ignore_eos=True, max_tokens=8, seed=11, temperature=1.0,
                   repetition_penalty=1.0)
    a = await _post(greedy, "/v1/chat/completions", **sampled)
    b = await _post(ignoring, "/v1/chat/completions", messages=CHAT, ignore_eos=True, max_tokens=8, seed=11)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    # Under "vllm" nothing of the file applies: the length is the rest of the context.
    out = await _post(ignoring, "/v1/chat/completions", messages=CHAT, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == MAX_MODEL_LEN - out["usage"]["prompt_tokens"]


async def test_a_model_without_the_file_keeps_our_defaults(plain_dir):
    cluster = LocalCluster(_args(plain_dir), served_model_name="m")
    try:
        assert cluster.default_sampling == {}
        out = await _post(cluster, "/v1/chat/completions", messages=CHAT, ignore_eos=True)
        assert out["usage"]["completion_tokens"] == MAX_MODEL_LEN - out["usage"]["prompt_tokens"]
        out = await _post(cluster, "/v1/completions", prompt=PROMPT, ignore_eos=True)
        assert out["usage"]["completion_tokens"] == 16  # OpenAI's and vLLM's completions default
        # temperature 1.0 (SamplingParams'): a seeded request equals one that says so
        a = await _post(cluster, "/v1/completions", prompt=PROMPT, max_tokens=8, seed=5)
        b = await _post(cluster, "/v1/completions", prompt=PROMPT, max_tokens=8, seed=5, temperature=1.0)
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
    finally:
        await cluster.shutdown()


# ---- gRPC --------------------------------------------------------------------------------
async def test_grpc_unset_fields_take_the_defaults(greedy):
    servicer = GenerateServicer(greedy)
    implicit = await servicer.Generate(build_request(PROMPT, ignore_eos=True, n=2))
    explicit = await servicer.Generate(build_request(PROMPT, ignore_eos=True, max_tokens=6, **EXPLICIT))
    ids = [list(c.token_ids) for c in implicit.completions]
    assert ids == [list(explicit.completions[0].token_ids)] * 2 and len(ids[0]) == 6


# ---- the offline LLM ---------------------------------------------------------------------
def test_llm_uses_the_defaults_without_sampling_params(greedy_dir, plain_dir):
    llm = LLM(greedy_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=8)
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.repetition_penalty, defaults.max_tokens) == (0.0, 1.3, 6)
        implicit = llm.generate([PROMPT], use_tqdm=False)[0].outputs[0]
        explicit = llm.generate([PROMPT], SamplingParams(max_tokens=6, **EXPLICIT),
                                use_tqdm=False)[0].outputs[0]
        assert implicit.token_ids == explicit.token_ids
    finally:
        llm.shutdown()
    llm = LLM(plain_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=8)
    try:
        assert llm.get_default_sampling_params().to_dict() == SamplingParams().to_dict()
    finally:
        llm.shutdown()
