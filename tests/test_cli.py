"""`raylm generate` and `python -m raylm`."""
import subprocess
import sys


def test_generate_cli(llama_dir):
    r = subprocess.run([sys.executable, "-m", "raylm", "generate", "The quick", "--model", llama_dir,
                        "--max-tokens", "4", "--dtype", "float32", "--max-model-len", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The quick")


def test_generate_cli_bad_input(llama_dir):
    r = subprocess.run([sys.executable, "-m", "raylm", "generate", "x", "--model", llama_dir,
                        "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max_tokens" in r.stderr


# ---- raylm serve: its make target, its defaults, its shutdown ----------------------
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from tests.helpers import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = "raylm.engine.standin_executor:StandInExecutor"


def test_make_serve_takes_the_port():
    r = subprocess.run(["make", "-n", "serve", "PORT=8001", "GRPC_PORT=9001", "ARGS=--api-key k"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "raylm serve" in ln]
    assert "--port 8001" in line and "--grpc-port 9001" in line and line.endswith("--api-key k")


def test_cli_defaults_are_the_cluster_defaults():
    from raylm import cli
    from raylm.cluster.app import FRONT_DEFAULTS
    from raylm.cluster.local import DEFAULT_MAX_QUEUED_REQUESTS

    ns = cli.build_parser().parse_args(["serve"])
    assert ns.max_queued_requests == DEFAULT_MAX_QUEUED_REQUESTS
    for name, default in FRONT_DEFAULTS.items():
        if name != "grpc_port":
            assert getattr(ns, name) == default, name


# A Ray cluster that raylm did not start, serving another Serve application: this script
# starts it, deploys the app, prints the GCS address and the app's URL, and holds on.
_CLUSTER = """
import sys, time, ray
from ray import serve
ctx = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
port = int(sys.argv[1])
serve.start(http_options={"host": "127.0.0.1", "port": port})

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    def __call__(self, request):
        return "other app"

serve.run(Other.bind(), name="other", route_prefix="/other")
print(ctx.address_info["gcs_address"], f"http://127.0.0.1:{port}/other", flush=True)
while True:
    time.sleep(1)
"""


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1", **extra)
    return env


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout  # against hangs only
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.2)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _sse_events(url: str, body: dict, first: threading.Event, out: list) -> None:
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                first.set()


def test_serve_joined_to_a_cluster_drains_and_deletes_only_its_app(llama_dir, tmp_path):
    """`raylm serve` with RAY_ADDRESS, on a stand-in model taking 0.1 s a step: Ctrl-C
    refuses new requests (503), ends a stream still running after --shutdown-timeout
    with finish_reason "abort", an error event and [DONE] (a gRPC stream likewise ends
    with "abort"), exits 0, and the cluster's other Serve application still serves."""
    from raylm.cluster.grpc_client import GenerateClient

    holder = subprocess.Popen([sys.executable, "-c", _CLUSTER, str(free_port())], cwd=ROOT,
                              env=_env(RAYLM_STANDIN_STEP_MS="100"), stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "cluster.log", "wb"), text=True,
                              start_new_session=True)
    proc = None
    try:
        gcs, other_url = holder.stdout.readline().split()
        port, grpc_port = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "raylm", "serve", llama_dir, "--port", str(port),
             "--grpc-port", str(grpc_port), "--max-model-len", "256", "--shutdown-timeout", "2",
             "--distributed-executor-backend", STANDIN],
            cwd=ROOT, env=_env(RAY_ADDRESS=gcs), stdout=open(tmp_path / "serve.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: proc.poll() is None and _up(url + "/v1/models"), 300, "raylm serve up")

        first, events = threading.Event(), []
        body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=_sse_events, args=(url + "/v1/completions", body, first, events))
        reader.start()
        grpc_client = GenerateClient(f"127.0.0.1:{grpc_port}", timeout=120)
        grpc_stream = grpc_client.generate_stream("hello", max_tokens=200, ignore_eos=True)
        assert not next(grpc_stream).finished
        assert first.wait(60)

        proc.send_signal(signal.SIGINT)
        refused = []

        def refusing() -> bool:
            try:
                r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
            except httpx.HTTPError:
                return False
            if r.status_code == 503:
                refused.append(r.json())
            return bool(refused)
        _wait(refusing, 60, "503 while draining")
        reader.join(120)
        grpc_last = list(grpc_stream)[-1]
        assert proc.wait(120) == 0
        grpc_client.close()
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            other_serves = _up(other_url)
        finally:  # Ctrl-C: the holder's ray.shutdown stops the cluster it started
            os.killpg(holder.pid, signal.SIGINT)
            try:
                holder.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(holder.pid, signal.SIGKILL)
                holder.wait()

    assert "shutting down" in refused[0]["error"]["message"]
    assert events[0] == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[1:-1]]
    assert chunks[-1]["error"]["code"] == 503 and "shutdown_timeout" in chunks[-1]["error"]["message"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c.get("choices")]
    assert finishes[-1] == "abort" and finishes.count("abort") == 1
    assert grpc_last.finished and grpc_last.completions[0].finish_reason == "abort"
    assert other_serves  # Ctrl-C deleted only raylm's application
    assert "shutting down" in open(tmp_path / "serve.log").read()
