"""The Ray Serve application in the shared Ray session, with two worker groups, each
engine core in its own process: the HTTP (OpenAI), gRPC and Python-handle entry points
give the same greedy text; 64 concurrent streams equal offline; /metrics through the
ingress counts both groups; the router gets no per-token message; client disconnects
abort and free blocks; a full queue answers 429 and the server keeps serving; bad input
gets its 4xx while the server keeps serving."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raylm import SamplingParams
from tests.helpers import free_port

PROMPT = "the quick brown fox"
QUEUE = 64  # waiting requests the router admits beyond the 2 x 8 running


@pytest.fixture(scope="module")
def served(ray_session, llama_dir):
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [
                    "raylm.cluster.raylm_pb2_grpc.add_GenerateServicer_to_server"]})
    serve.run(build_app({"model": llama_dir, "max_model_len": 128, "num_groups": 2,
                         "max_num_seqs": 8, "max_queued_requests": QUEUE,
                         "served_model_name": "tiny-llama", "max_n": 4}),
              name=APP_NAME, route_prefix="/")
    yield {"url": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}",
           "handle": serve.get_app_handle(APP_NAME)}
    serve.delete(APP_NAME)
    serve.shutdown()


def _router():
    from ray import serve

    return serve.get_deployment_handle("Router", app_name="raylm")


def _router_stats():
    return _router().stats.remote().result()


def _metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, s.labels.get("finished_reason"))
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_http_handle_and_grpc_agree(served):
    from raylm.cluster.grpc_client import GenerateClient

    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    r = httpx.post(served["url"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    http_text = r.json()["choices"][0]["text"]

    sp = SamplingParams(max_tokens=8, temperature=0)
    out = served["handle"].generate.remote(PROMPT, sp).result()
    assert out.finished and out.outputs[0].text == http_text

    async def stream():
        h = served["handle"].options(stream=True)
        return [o async for o in h.generate_stream.remote(PROMPT, sp)]
    outs = asyncio.run(stream())
    assert outs[-1].finished and outs[-1].outputs[0].text == http_text

    client = GenerateClient(served["grpc"], app_name="raylm")
    try:
        assert client.generate(PROMPT, max_tokens=8, temperature=0).completions[0].text == http_text
    finally:
        client.close()

    models = httpx.get(served["url"] + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert httpx.get(served["url"] + "/health").status_code == 200


def test_disconnects_abort_and_free_blocks(served):
    url = served["url"]
    before = _metrics(url)
    assert _router_stats()["blocks_in_use"] == 0
    body = {"prompt": "keep going", "max_tokens": 100, "ignore_eos": True, "stream": True}

    async def open_and_close(client):
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    break  # leave after the first chunk

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*[open_and_close(client) for _ in range(50)])
    asyncio.run(main())

    # Each of the 50 ends as an abort, unless its whole output was already written
    # before the disconnect reached the server (a client slow to read its first line on a
    # loaded machine): then it ends as length. Either way, nothing stays held.
    deadline = time.time() + 60
    while time.time() < deadline:
        stats = _router_stats()
        after = _metrics(url)
        ended = {r: after[("raylm:request_success_total", r)] - before[("raylm:request_success_total", r)]
                 for r in ("abort", "length")}
        if stats["blocks_in_use"] == 0 and sum(ended.values()) == 50:
            break
        time.sleep(0.2)
    assert sum(ended.values()) == 50 and ended["abort"] >= 40, ended
    assert stats["blocks_in_use"] == 0 and stats["num_requests_running"] == 0
    assert after[("raylm:kv_cache_usage_perc", None)] == 0


def test_bad_input_gets_4xx_and_server_keeps_serving(served):
    url = served["url"]
    cases = [
        ({"prompt": "x" * 2000, "max_tokens": 4}, 400),                 # over max_model_len
        ({"prompt": PROMPT, "max_tokens": "many"}, 400),                # wrong type
        ({"prompt": PROMPT, "n": 5}, 400),                              # over max_n
        ({"model": "nope", "prompt": PROMPT}, 404),                     # unknown model
    ]
    for body, status in cases:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    good = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert good.status_code == 200
    m = _metrics(url)
    assert m[("raylm:request_success_total", "length")] >= 1
    assert m[("raylm:generation_tokens_total", None)] > 0


def test_two_core_processes_serve_64_streams_as_offline(served, llama_dir):
    import ray

    from raylm import LLM

    prompts = [f"stream number {i} says" for i in range(64)]
    llm = LLM(llama_dir, max_model_len=128)
    expected = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    llm.shutdown()
    url = served["url"]
    before = _router_stats()
    metrics_before = _metrics(url)

    async def one(client, prompt):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": True}
        text = ""
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["text"]
        return text

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[one(client, p) for p in prompts])
    assert asyncio.run(main()) == expected

    after = _router_stats()
    routed = [a["requests_routed"] - b["requests_routed"] for a, b in zip(after["groups"], before["groups"])]
    assert sum(routed) == 64 and all(r > 0 for r in routed), routed
    # Each group's loop runs in its own process.
    actors = _router().cores.remote().result()
    pids = {ray.get(a.ready.remote())["pid"] for _, a in actors}
    assert len(pids) == 2
    # The router saw O(1) messages per request: one assign each, releases batched; no
    # message per token (64 x 12 tokens were streamed).
    calls = {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in after["calls"]}
    assert calls["assign"] == 64 and calls.get("release", 0) <= 64, calls
    assert sum(calls.values()) < 64 * 3, calls
    # /metrics through the ingress counts the requests of both groups.
    deadline = time.time() + 60
    while True:
        m = _metrics(url)
        done = m[("raylm:request_success_total", "length")] - metrics_before[("raylm:request_success_total", "length")]
        if done == 64 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert done == 64
    text = httpx.get(url + "/metrics").text
    for engine in ("0", "1"):
        gen = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "raylm:generation_tokens_total" and s.labels["engine"] == engine]
        assert gen and gen[0] > 0


def test_past_the_queue_bound_a_429_and_serving_goes_on(served):
    url = served["url"]
    body = {"prompt": "fill the queue", "max_tokens": 100, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*[client.post(url + "/v1/completions", json=body)
                                          for _ in range(2 * 8 + QUEUE + 40)])
    rs = asyncio.run(main())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 * 8 + QUEUE and 429 in codes, codes
    refused = next(r for r in rs if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "max_queued_requests" in refused.json()["error"]["message"]
    ok = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200
