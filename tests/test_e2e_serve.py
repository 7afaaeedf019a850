"""End to end, each in its own process and its own Ray cluster (one at a time):
`raylm serve` on the embedded SmolLM2 model driven by the official `openai` client,
and `serve run deploy/serve.yaml`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a fresh cluster, not the test session's
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    return env


# Deadlines against hangs only, at least ten times what they guard on the 2-core machine with
# a load of 4-7 from others: start-up 17-24 s, Ctrl-C to exit 6.5-8.4 s.
def _start(cmd: list[str], url: str, log_path: str, timeout: float = 300) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    _stop(proc)
    raise AssertionError(f"{cmd} did not come up in {timeout} s:\n{open(log_path).read()[-4000:]}")


def _stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Ctrl-C, as a user would; the whole process group goes if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


@pytest.fixture(scope="module")
def raylm_server(tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log = str(tmp_path_factory.mktemp("serve") / "raylm-serve.log")
    cmd = [sys.executable, "-m", "raylm", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", str(grpc_port), "--max-model-len", "1024", "--max-num-seqs", "16",
           "--api-server-count", "2"]
    proc = _start(cmd, f"http://127.0.0.1:{port}", log)
    yield f"http://127.0.0.1:{port}", proc, log
    if proc.poll() is None:
        _stop(proc)


def test_openai_client_against_raylm_serve(raylm_server):
    import openai

    url, proc, log = raylm_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                     temperature=0, logprobs=2)
    choice = comp.choices[0]
    assert choice.text and comp.usage.completion_tokens == len(choice.logprobs.tokens)
    assert all(len(t) <= 3 for t in choice.logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if c.choices)
    assert streamed == choice.text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    answer = chat.choices[0].message.content
    assert "Paris" in answer
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    two = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                         temperature=1.0, n=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1]
    stopped = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=16,
                                        temperature=0, stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                        temperature=0, logprobs=True, top_logprobs=2)
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="hi", max_tokens=5000)
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].text is not None

    # Ctrl-C shuts it down cleanly.
    assert _stop(proc) == 0
    assert "shutting down" in open(log).read()


def test_serve_run_yaml(tmp_path):
    with open(os.path.join(ROOT, "deploy", "serve.yaml")) as f:
        config = yaml.safe_load(f)
    port = free_port()
    config["http_options"]["port"] = port
    config["grpc_options"]["port"] = free_port()
    config["applications"][0]["args"]["max_model_len"] = 512
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    url = f"http://127.0.0.1:{port}"
    proc = _start([serve_bin, "run", str(path)], url, str(tmp_path / "serve-run.log"))
    try:
        models = httpx.get(url + "/v1/models", timeout=30).json()
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"model": models["data"][0]["id"], "prompt": "Hello", "max_tokens": 4,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        _stop(proc)
