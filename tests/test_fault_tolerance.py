"""No request lost when a worker group dies, on the Serve application with two groups
(each engine core in its own Ray actor process) on the CPU: a core process killed with
SIGKILL mid-generation, a hung step, an ingress replica killed. Greedy and seeded
streams finish as an undisturbed run; the group restarts and serves again; health and
metrics tell what happened; no block stays held."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import pytest

from raylm import LLM, SamplingParams
from tests.helpers import free_port

APP = "raylm-ft"
MAX_TOKENS = 24


def _router():
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=APP)


def _wait(cond, timeout=180.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def app(ray_session, llama_dir):
    from ray import serve

    from raylm.cluster.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(build_app({"model": llama_dir, "max_model_len": 128, "num_groups": 2, "max_num_seqs": 16,
                         "served_model_name": "tiny", "api_server_count": 2, "http_port": port,
                         "step_timeout": 4.0}),
              name=APP, route_prefix="/ft")
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP)
    serve.shutdown()  # Serve's options are set at its start: the next module starts its own


def _bodies():
    out = []
    for i in range(32):
        body = {"model": "tiny", "prompt": f"stream {i} of the fault test", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        body.update({"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.9, "seed": i})
        out.append(body)
    return out


@pytest.fixture(scope="module")
def undisturbed(llama_dir):
    llm = LLM(llama_dir, max_model_len=128)
    params = [SamplingParams(max_tokens=b["max_tokens"], ignore_eos=True, temperature=b["temperature"],
                             top_p=b.get("top_p", 1.0), seed=b.get("seed")) for b in _bodies()]
    texts = [o.outputs[0].text for o in llm.generate([b["prompt"] for b in _bodies()], params, use_tqdm=False)]
    llm.shutdown()
    return texts


async def _stream(client, url, body, started: asyncio.Event):
    text, usage = "", None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                started.set()
            if chunk.get("usage"):
                usage = chunk["usage"]
    return text, usage


def _core_pids():
    import ray

    return [ray.get(a.ready.remote())["pid"] for _, a in _router().cores.remote().result()]


def _both_serving(url):
    r = httpx.get(url + "/health", timeout=30)
    body = r.json()
    return r.status_code == 200 and [g["state"] for g in body["groups"]] == ["serving", "serving"]


def _metric(url, name):
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _run_with(url, disturb) -> list[tuple[str, dict]]:
    """Stream every body at once; call disturb() once the streams have output.
    (text, usage) of each."""
    async def main():
        started = asyncio.Event()
        async with httpx.AsyncClient(timeout=600) as client:
            tasks = [asyncio.ensure_future(_stream(client, url, b, started)) for b in _bodies()]
            await started.wait()
            await asyncio.to_thread(disturb)
            return await asyncio.gather(*tasks)
    return asyncio.run(main())


def test_a_killed_core_process_loses_no_request(app, undisturbed):
    url = app
    _wait(lambda: _both_serving(url), what="both groups serving")
    moved_before = _metric(url, "raylm:requests_redispatched_total")
    victim = _core_pids()[0]
    moved = _run_with(url, lambda: os.kill(victim, signal.SIGKILL))
    assert [text for text, _ in moved] == undisturbed
    assert _metric(url, "raylm:requests_redispatched_total") > moved_before
    # The group comes back with a new process and serves again; no block stays held.
    _wait(lambda: _both_serving(url), what="the group's restart")
    assert _core_pids()[0] != victim
    assert _metric(url, "raylm:group_restarts_total") >= 1
    calm = _run_with(url, lambda: None)
    assert [text for text, _ in calm] == undisturbed
    # Usage counts the original prompt and every generated token once.
    assert [usage for _, usage in moved] == [usage for _, usage in calm]
    assert all(usage["completion_tokens"] == MAX_TOKENS for _, usage in moved)
    routed = [g["requests_routed"] for g in _router().stats.remote().result()["groups"]]
    assert all(r > 0 for r in routed)
    _wait(lambda: _router().stats.remote().result()["blocks_in_use"] == 0, what="blocks freed")


def test_a_hung_step_is_detected_and_its_requests_move(app, undisturbed):
    url = app
    _wait(lambda: _both_serving(url), what="both groups serving")
    _, actor = _router().cores.remote().result()[1]
    texts = _run_with(url, lambda: actor.hang_for_test.remote(3600))
    assert [text for text, _ in texts] == undisturbed
    health = httpx.get(url + "/health", timeout=30).json()
    assert set(health) == {"status", "groups"}
    assert all(set(g) == {"id", "state", "last_step_age_s"} for g in health["groups"])
    _wait(lambda: _both_serving(url), what="the hung group's restart")
    assert _router().stats.remote().result()["groups"][1]["restarts"] >= 1


def test_a_killed_ingress_replica_frees_its_streams_blocks(app):
    import psutil

    url = app
    _wait(lambda: _both_serving(url), what="both groups serving")
    replicas = [p for p in psutil.process_iter(["cmdline"])
                if any("ServeReplica:" + APP + ":Ingress" in c for c in (p.info["cmdline"] or []))]
    assert len(replicas) == 2

    async def main():
        started = asyncio.Event()
        body = {"model": "tiny", "prompt": "a long one", "max_tokens": 100, "ignore_eos": True,
                "temperature": 0, "stream": True}
        async with httpx.AsyncClient(timeout=600) as client:
            tasks = [asyncio.ensure_future(_stream(client, url, body, started)) for _ in range(8)]
            await started.wait()
            # The kernel spreads the connections over the replicas (SO_REUSEPORT): kill one
            # that carries a stream (all 8 on one replica happen one run in 128).
            port = int(url.rsplit(":", 1)[1])
            carrying = [p for p in replicas if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                                                   for c in p.net_connections(kind="tcp"))]
            assert carrying, "no ingress replica holds a stream's connection"
            carrying[0].send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks, return_exceptions=True)
    results = asyncio.run(main())
    assert any(isinstance(r, Exception) for r in results)  # the streams it carried broke
    # Its requests are aborted in the cores; the others finish: no block stays held.
    _wait(lambda: _router().stats.remote().result()["blocks_in_use"] == 0, what="blocks freed")
    _wait(lambda: httpx.post(url + "/v1/completions", timeout=60,
                             json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200,
          what="serving after the replica's replacement")


def _standin_core(llama_dir, step_ms: int = 1000):
    """An engine core actor over the stand-in model (`step_ms` a step), started."""
    import dataclasses

    import ray

    from raylm.cluster.core_actor import EngineCoreActor
    from raylm.engine.config import EngineArgs

    args = EngineArgs(model=llama_dir, device="cpu", max_model_len=128, async_scheduling=True,
                      distributed_executor_backend="raylm.engine.standin_executor:StandInExecutor")
    core = ray.remote(EngineCoreActor).options(
        num_cpus=0, max_concurrency=100,
        runtime_env={"env_vars": {"RAYLM_STANDIN_STEP_MS": str(step_ms)}}).remote(dataclasses.asdict(args), 0)
    ray.get(core.ready.remote())
    return core


def _connect_outputs(where: dict, token: str = None) -> socket.socket:
    """A subscriber's output connection, opened as RayCoreClient opens it (the token as one frame)."""
    sock = socket.create_connection((where["host"], where["port"]), timeout=60)
    token = (token or where["token"]).encode("ascii")
    sock.sendall(len(token).to_bytes(4, "little") + token)
    return sock


def _read_frame(stream):
    """One msgpack frame from a core's connection, read through a buffered file
    (`sock.makefile("rb")`: read(n) returns n bytes, or fewer at the end), whole."""
    import msgpack

    size = int.from_bytes(stream.read(4), "little")
    body = stream.read(size)
    assert size and len(body) == size
    return msgpack.unpackb(body, strict_map_key=False)


def _add_long_request(core, subscriber: str = "sub") -> None:
    import msgpack
    import ray

    from raylm.engine.core import EngineCoreRequest

    request = EngineCoreRequest("r", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True),
                                subscriber=subscriber)
    ray.get(core.add_requests.remote(msgpack.packb([request.to_wire()])))
    _wait(lambda: ray.get(core.snapshot.remote(-1, False))["stats"]["num_requests_running"] == 1,
          timeout=60, what="the request running")


def _wait_aborted(core) -> dict:
    import ray

    snap = _wait(lambda: (lambda s: s if s["metrics"]["success"]["abort"] == 1 else None)(
        ray.get(core.snapshot.remote(-1, False))), timeout=60, what="the abort")
    assert snap["stats"]["num_requests_running"] == 0 and snap["stats"]["blocks_in_use"] == 0
    assert snap["stats"]["generation_tokens"] < 100
    return snap


def test_a_core_drops_the_requests_of_a_dead_subscriber(ray_session, llama_dir):
    """An ingress replica whose host vanishes leaves its output connection open with no
    one reading it (here the test holds it open): the core also pings the subscribing
    actor, and when it is gone aborts its requests (long before they could finish: the
    stand-in model takes 1 s a step, the request wants 100 tokens) and names them in its
    snapshots, for the router to release."""
    import ray

    @ray.remote(num_cpus=0)
    class Subscriber:
        def ping(self):
            return True

    core = _standin_core(llama_dir)
    owner = Subscriber.remote()
    try:
        ray.get(owner.ping.remote())
        where = ray.get(core.open_outputs.remote("sub", owner))
        sock = _connect_outputs(where)  # kept open: only the ping can tell
        _add_long_request(core)
        ray.kill(owner)
        snap = _wait_aborted(core)
        assert snap["orphans"] == ["r"]  # the router releases it: its frontend is gone
        sock.close()
    finally:
        ray.kill(core)


def test_a_closed_output_connection_aborts_its_requests_and_a_bad_token_reads_nothing(ray_session, llama_dir):
    """The subscriber's connection carries its outputs as length-prefixed msgpack frames;
    closing it aborts the subscriber's requests at once (blocks freed). A connection with
    a token the core did not give, or a first frame longer than a token, is closed
    without a byte of output, and a token opens one connection only."""
    import ray

    from raylm.engine.core import EngineCoreOutput

    core = _standin_core(llama_dir, step_ms=200)
    try:
        where = ray.get(core.open_outputs.remote("sub"))
        stranger = _connect_outputs(where, token="0" * 32)
        assert stranger.recv(1) == b""  # closed by the core: no outputs for a wrong token
        stranger.close()
        greedy = socket.create_connection((where["host"], where["port"]), timeout=60)
        greedy.sendall((1 << 31).to_bytes(4, "little"))  # a 2 GiB first frame: refused, not buffered
        assert greedy.recv(1) == b""
        greedy.close()
        sock = _connect_outputs(where)
        _add_long_request(core)
        stream = sock.makefile("rb")
        outs = [EngineCoreOutput.from_wire(r) for r in _read_frame(stream)]
        assert outs and outs[0].request_id == "r" and outs[0].new_token_ids
        again = _connect_outputs(where)  # the token again, after it opened `sock`: refused
        assert again.recv(1) == b""
        again.close()
        stream.close()
        sock.close()
        _wait_aborted(core)
    finally:
        ray.kill(core)


def test_requests_and_aborts_travel_on_the_output_connection(ray_session, llama_dir):
    """An ingress replica's view of a core (RayCoreClient) sends its requests and aborts
    on the connection it reads outputs from, in order, with no Ray call each: here the
    actor handle it holds refuses add_requests and abort, yet the request runs, streams
    its tokens and is aborted (its blocks freed)."""
    import ray

    from raylm.cluster.core_actor import RayCoreClient
    from raylm.engine.core import EngineCoreRequest

    class NoPerRequestCalls:  # the core actor, but only its subscription methods
        def __init__(self, actor):
            self._actor = actor

        def __getattr__(self, name):
            assert name in ("open_outputs", "unsubscribe"), f"a Ray call to {name}"
            return getattr(self._actor, name)

    core = _standin_core(llama_dir, step_ms=50)

    async def scenario() -> list:
        client = RayCoreClient(NoPerRequestCalls(core), 0)
        got, failed = [], []
        client.subscribe("sub", got.extend, failed.append)
        request = EngineCoreRequest("r", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True),
                                    subscriber="sub")
        await client.add([request])
        for _ in range(1200):  # up to 60 s for some tokens
            if sum(len(o.new_token_ids) for o in got) >= 3:
                break
            await asyncio.sleep(0.05)
        client.abort(["r"])
        for _ in range(1200):  # before unsubscribing, which would abort it too
            snap = await core.snapshot.remote(-1, False)
            if snap["metrics"]["success"]["abort"] == 1:
                break
            await asyncio.sleep(0.05)
        client.unsubscribe("sub")
        assert not failed, failed
        return got, snap

    try:
        got, snap = asyncio.run(scenario())
        assert snap["metrics"]["success"]["abort"] == 1 and snap["stats"]["blocks_in_use"] == 0
        assert all(o.request_id == "r" for o in got)
        assert 3 <= sum(len(o.new_token_ids) for o in got) < 100
    finally:
        ray.kill(core)


def test_a_core_pushes_its_snapshots_on_a_connection(ray_session, llama_dir):
    """The router reads a core's state from a connection the core writes a snapshot to
    every `interval` (open_snapshots): the first holds every cached block hash (since=-1),
    the later ones only the prefix-cache events after the one before; a request's work
    shows in them with no Ray call. A wrong token reads nothing."""
    import ray

    core = _standin_core(llama_dir, step_ms=50)
    try:
        where = ray.get(core.open_snapshots.remote(-1, 0.05))
        stranger = _connect_outputs(where, token="1" * 32)
        assert stranger.recv(1) == b""
        stranger.close()
        sock = _connect_outputs(where)
        stream = sock.makefile("rb")
        first = _read_frame(stream)
        assert first["hashes"] == [] and first["alive"] and "events" not in first
        _add_long_request(core)
        snaps = [_read_frame(stream) for _ in range(3)]
        assert all("events" in s and "hashes" not in s for s in snaps)
        assert all(s["seq"] >= first["seq"] for s in snaps)
        seen = _wait(lambda: (lambda s: s if s["stats"]["generation_tokens"] > 0 else None)(_read_frame(stream)),
                     timeout=60, what="the request's tokens in a pushed snapshot")
        assert seen["stats"]["num_requests_running"] == 1
        assert ray.get(core.call_counts.remote())["open_snapshots"] == 1
        stream.close()
        sock.close()
    finally:
        ray.kill(core)


def test_the_router_follows_its_cores_without_a_ray_call_a_poll(app):
    """The router keeps its view of each group current from the pushed snapshots: over
    two seconds of its polls at 20 a second it reads snapshots from the connections and
    the cores answer no snapshot call (each core has opened its snapshot connection once
    or, after a lost connection or a restart, a few times)."""
    import ray

    _wait(lambda: _both_serving(app), what="both groups serving")
    cores = [a for _, a in _router().cores.remote().result()]
    pushed = _router().stats.remote().result()["snapshots_pushed"]  # (stats itself asks by call)
    before = [ray.get(c.call_counts.remote()) for c in cores]
    time.sleep(2.0)
    after = [ray.get(c.call_counts.remote()) for c in cores]
    assert [b.get("snapshot", 0) for b in before] == [a.get("snapshot", 0) for a in after], (before, after)
    assert all(1 <= a["open_snapshots"] <= 3 for a in after), after
    assert _router().stats.remote().result()["snapshots_pushed"] > pushed
