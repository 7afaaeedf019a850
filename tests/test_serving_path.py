"""The serving path's parts: the core's token-id messages on the wire, the core loop's
one batch per subscriber per step, the router (ledger, affinity from published block
hashes, load, admission), and, through the in-process cluster, stop strings matched at
the edge stopping the core's request and the router seeing no per-token message."""
from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest

from raylm import LLM, SamplingParams
from raylm.cluster.frontend import next_item
from raylm.cluster.local import LocalCluster
from raylm.cluster.router import KV_FULL, NoGroupAvailable, Overloaded, Router
from raylm.engine.config import EngineArgs
from raylm.engine.core import EngineCore, EngineCoreOutput, EngineCoreRequest
from raylm.engine.core_loop import CoreLoop
from raylm.engine.outputs import CompletionOutput, RequestOutput
from raylm.scheduler.block_manager import prefix_block_hashes
from raylm.workers.messages import TokenLogprobs

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- the wire ---------------------------------------------------------------------
def test_core_messages_round_trip_through_msgpack():
    req = EngineCoreRequest("r1", [1, 2, 3], SamplingParams(temperature=0.5, seed=3, stop=["x"]),
                            index=1, prefix_group="g", arrival_time=2.5, priority=1, subscriber="s")
    again = EngineCoreRequest.from_wire(msgpack.unpackb(msgpack.packb(req.to_wire())))
    assert again == req
    lp = TokenLogprobs([5, 6], [-0.1, -2.0], 6, -2.0, 2)
    out = EngineCoreOutput("r1", [6], [lp], [lp], "length", None, 16, None, subscriber="s")
    back = EngineCoreOutput.from_wire(msgpack.unpackb(msgpack.packb(out.to_wire())))
    assert back == out and back.subscriber is None  # where it goes is not on the wire
    assert EngineCoreOutput.from_wire(msgpack.unpackb(msgpack.packb(EngineCoreOutput("e", error="x").to_wire()))).finished


def _out(rid, text, finished=False):
    return RequestOutput(rid, None, [1], None, [CompletionOutput(0, text, [1], None, None)], finished)


def test_next_item_coalesces_up_to_a_final_or_an_error():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for item in (_out("a", "1"), _out("a", "12"), _out("a", "123", finished=True)):
            q.put_nowait(item)
        assert (await next_item(q)).finished
        q.put_nowait(_out("a", "1"))
        q.put_nowait(ValueError("bad"))
        q.put_nowait(_out("a", "12"))
        assert isinstance(await next_item(q), ValueError)
    asyncio.run(main())


def test_detached_tasks_do_not_see_the_callers_context():
    import contextvars

    from raylm.cluster.frontend import detached

    var = contextvars.ContextVar("request", default=None)

    async def main():
        var.set("request-1")

        async def look():
            return var.get()
        return await detached(look()), await asyncio.ensure_future(look())
    assert asyncio.run(main()) == (None, "request-1")


# ---- the router -------------------------------------------------------------------
def _snapshot(seq, events=None, hashes=None, **stats):
    snap = {"stats": stats, "metrics": None, "seq": seq, "alive": True}
    if hashes is not None:
        snap["hashes"] = hashes
    else:
        snap["events"] = events or []
    return snap


def test_a_request_no_frontend_releases_does_not_make_an_idle_group_look_hung():
    """A core is hung when it holds work and its step counter stops. A request routed to it
    and not yet taken in counts as work; one routed before the core stepped again does not
    (an ingress replica that died leaves its requests in the ledger: the core aborted them,
    and an idle core must not be restarted for them every step_timeout)."""
    import time

    r = Router(num_groups=1, max_num_seqs=4, max_queued_requests=8, step_timeout=4.0)
    r.assign("leaked", [], 1)  # its replica dies; nobody releases it
    r.update(0, _snapshot(0, steps=10, num_requests_running=1))
    r.update(0, _snapshot(0, steps=12))  # the core stepped, aborted it, and is idle
    t = time.monotonic()  # later snapshots carry their own times
    for dt in (3, 8, 20):
        r.update(0, _snapshot(0, steps=12), now=t + dt)
    assert r.watch(now=t + 21) == [] and r.groups[0].alive
    r.assign("new", [], 1)  # routed after the last step: work the core holds until it steps
    r.update(0, _snapshot(0, steps=12), now=t + 22)
    assert r.watch(now=t + 23) == []
    assert r.watch(now=t + 25) == [0] and "no step" in r.groups[0].error


def test_router_releases_the_requests_a_core_dropped_with_their_subscriber():
    """A core names the requests it dropped because their ingress replica died (no
    frontend will release them): the router releases those it routed to that group."""
    r = Router(num_groups=2, max_num_seqs=4, max_queued_requests=8)
    for rid in ("a", "b"):
        assert r.assign(rid, [], 1) in (0, 1)
    ga = r.group_of("a")
    r.update(1 - ga, dict(_snapshot(0), orphans=["a"]))  # not that group's: kept
    assert r.group_of("a") == ga
    r.update(ga, dict(_snapshot(0), orphans=["a"]))
    assert r.group_of("a") is None and r.groups[ga].inflight_seqs == (1 if r.group_of("b") == ga else 0)
    assert r.group_of("b") is not None


def test_router_applies_each_prefix_cache_event_once_whatever_the_snapshots_order():
    """A core's snapshots reach the router on two paths (pushed, and asked for by /metrics
    and stats), so one may repeat events already applied or end before them: the router
    applies the new part only, and an older snapshot leaves the hashes as they are."""
    r = Router(num_groups=1, max_num_seqs=4, max_queued_requests=8)
    a, b = 11, 22
    r.update(0, _snapshot(2, hashes=[a, b]))
    r.update(0, _snapshot(4, events=[(0, a), (0, b)]))  # events 3 and 4: both evicted
    r.update(0, _snapshot(3, events=[(1, a), (0, a)]))  # events 2..3, asked for before: old
    assert r.groups[0].cached == set() and r.groups[0].seq == 4
    r.update(0, _snapshot(5, events=[(0, b), (1, a)]))  # events 4..5: only 5 is new
    assert r.groups[0].cached == {a} and r.groups[0].seq == 5
    r.update(0, _snapshot(3, hashes=[b]))  # a full list older than what is applied
    assert r.groups[0].cached == {a} and r.groups[0].seq == 5


def test_router_follows_published_hashes_and_load():
    r = Router(num_groups=2, max_num_seqs=4, max_queued_requests=8)
    prefix = prefix_block_hashes(list(range(40)), 4)  # 9 full blocks
    r.update(1, _snapshot(3, hashes=prefix[:5]))
    assert r.assign("a", prefix, 1) == 1  # group 1 caches the prefix
    r.update(1, _snapshot(5, events=[(0, prefix[0])]))  # evicted: nothing leads any more
    assert r.groups[1].seq == 5 and prefix[0] not in r.groups[1].cached
    assert r.assign("b", [123], 1) == 0  # no prefix: the less loaded group
    # A burst sharing a prefix follows the first request before its KV is cached...
    assert r.assign("c", prefix_block_hashes([7] * 40, 4), 1) == 0
    assert r.assign("d", prefix_block_hashes([7] * 40, 4), 1) == 0
    # ... unless that group is clearly busier.
    r.update(0, _snapshot(1, kv_cache_usage_perc=0.9))
    assert r.assign("e", prefix_block_hashes([7] * 40, 4), 1) == 1
    r.release(["a", "b", "c", "d", "e", "unknown"])
    assert not r.ledger and all(g.inflight_seqs == 0 and not g.inflight_hashes for g in r.groups)
    with pytest.raises(ValueError, match="already in use"):
        r.assign("x", [], 1)
        r.assign("x", [], 1)


def test_router_fills_free_slots_before_queueing_behind_stale_kv_usage():
    """Group 0's snapshot says its KV is 30 % used, group 1's 0 %: the load alone would give
    group 1 some 77 more requests than group 0, past its 256 slots, to wait a whole round
    while group 0 has room. A group with a free slot comes first; past every group's slots
    the requests spread by load again."""
    r = Router(num_groups=2, max_num_seqs=256, max_queued_requests=1024)
    r.update(0, _snapshot(1, kv_cache_usage_perc=0.3))
    r.update(1, _snapshot(1, kv_cache_usage_perc=0.0))
    for i in range(512):
        r.assign(f"r{i}", [], 1)
    assert [g.inflight_seqs for g in r.groups] == [256, 256]
    for i in range(512, 612):
        r.assign(f"r{i}", [], 1)
    assert r.groups[1].inflight_seqs > r.groups[0].inflight_seqs  # queued where the KV is emptier
    # A cached prefix does not pull a request into a full group while another has room.
    r.release([rid for rid in list(r.ledger) if r.group_of(rid) == 1])
    r.release([rid for rid in list(r.ledger) if r.group_of(rid) == 0][256:])  # group 0 full, 1 empty
    prefix = prefix_block_hashes(list(range(40)), 4)
    r.update(0, _snapshot(2, hashes=prefix))
    assert r.assign("p", prefix, 1) == 1
    # A group whose KV is full has no room even with free sequence slots.
    r.release(list(r.ledger))
    r.update(0, _snapshot(3, kv_cache_usage_perc=KV_FULL))
    r.update(1, _snapshot(2, kv_cache_usage_perc=0.5))
    assert r.assign("q", [], 1) == 1


def test_router_admission_and_dead_groups():
    r = Router(num_groups=2, max_num_seqs=2, max_queued_requests=3)
    for i in range(7):  # 4 run at once, 3 wait
        r.assign(f"r{i}", [], 1)
    with pytest.raises(Overloaded, match="max_queued_requests is 3") as info:
        r.assign("r7", [], 1)
    assert info.value.retry_after >= 1 and r.num_rejected == 1
    r.release(["r0"])
    r.assign("r7", [], 1)  # room again
    r.mark_dead(0, "gone")
    r.release([f"r{i}" for i in range(8)])
    assert r.assign("s", [], 1) == 1  # the dead group gets nothing
    r.mark_dead(1, "gone too")
    with pytest.raises(NoGroupAvailable, match="no worker group is serving"):
        r.assign("t", [], 1)


class _FakeRouterHandle:
    """The Router deployment's handle as ServeRouterClient calls it, over a real Router;
    each assign_many call takes `delay` seconds, like a Serve hop."""

    def __init__(self, router: Router, delay: float = 0.02):
        self.router, self.delay, self.batches = router, delay, []
        self.assign_many = type("M", (), {"remote": staticmethod(self._assign_many)})()
        self.release = type("M", (), {"remote": staticmethod(self._release)})()

    async def _assign_many(self, items):
        self.batches.append([item[0] for item in items])
        await asyncio.sleep(self.delay)
        out = []
        for rid, hashes, n, redispatch, _ in items:
            try:
                out.append(("ok", self.router.assign(rid, hashes, n, redispatch), 0))
            except Overloaded as exc:
                out.append(("overloaded", str(exc), exc.retry_after))
        return out

    async def _release(self, ids):
        self.router.release(ids)


def test_router_client_sends_a_burst_of_assigns_in_few_calls_and_frees_abandoned_ones():
    """A burst of requests costs the router a few calls (one in flight per ingress
    replica, the rest waiting for it), each request gets its own answer, and a caller
    that leaves while its call is in flight has its place released, not leaked."""
    from raylm.cluster.router_deployment import ServeRouterClient

    async def main():
        router = Router(num_groups=2, max_num_seqs=64, max_queued_requests=10)
        handle = _FakeRouterHandle(router)
        client = ServeRouterClient(handle)
        first = asyncio.ensure_future(client.assign("r0", [], 1))
        await asyncio.sleep(0.001)  # its call is in flight: the next 99 wait for it, together
        answers = [await first] + await asyncio.gather(*(client.assign(f"r{i}", [], 1) for i in range(1, 100)),
                                                       return_exceptions=True)
        assert len(handle.batches) == 2 and handle.batches[0] == ["r0"], handle.batches
        assert sorted(sum(handle.batches, [])) == sorted(f"r{i}" for i in range(100))
        ok = [a for a in answers if isinstance(a, tuple)]
        assert len(ok) == 100 and {g for g, _ in ok} == {0, 1}  # 128 slots + 10 queued: all fit
        over = await asyncio.gather(*(client.assign(f"s{i}", [], 1) for i in range(40)),
                                    return_exceptions=True)
        refused = [a for a in over if isinstance(a, Overloaded)]
        assert len(refused) == 2 and "max_queued_requests is 10" in str(refused[0])
        router.release([f"r{i}" for i in range(100)] + [f"s{i}" for i in range(40)])
        # Callers that leave while their call is in flight: their places come back.
        waiting = [asyncio.ensure_future(client.assign(f"t{i}", [], 1)) for i in range(5)]
        await asyncio.sleep(0)
        for task in waiting:
            task.cancel()
        await asyncio.sleep(0.1)
        assert not router.ledger, router.ledger

    asyncio.run(main())


# ---- the core loop ----------------------------------------------------------------
def test_core_loop_sends_one_batch_per_subscriber_per_step(llama_dir):
    core = EngineCore(EngineArgs(model=llama_dir, max_model_len=128))
    delivered, done = [], threading.Event()

    def deliver(batches):
        delivered.append({sub: [o.request_id for o in outs] for sub, outs in batches.items()})
        if sum(o.finished for outs in batches.values() for o in outs):
            finished.extend(o.request_id for outs in batches.values() for o in outs if o.finished)
        if len(finished) == 4:
            done.set()
    finished: list = []
    loop = CoreLoop(core, deliver).start()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        loop.add([EngineCoreRequest(f"{s}{i}", [5 + i, 6, 7], params.clone(), subscriber=s)
                  for s in ("A", "B") for i in range(2)])
        assert done.wait(60)
        decode_steps = [d for d in delivered if len(d.get("A", [])) == 2 and len(d.get("B", [])) == 2]
        assert len(decode_steps) >= 4  # each step: one batch for A, one for B, both requests in it
        snap = loop.snapshot(-1)
        assert snap["stats"]["requests_finished"] == 4 and snap["alive"]
        assert sorted(snap["hashes"]) == sorted(core.block_manager.hash_to_block)
        assert loop.snapshot(snap["seq"])["events"] == []
    finally:
        loop.stop()
        core.shutdown()


def test_core_loop_event_log_answers_each_reader_from_where_it_is(monkeypatch):
    """The prefix-cache events a snapshot returns are exactly those after the reader's seq,
    read from the log's right end; a reader behind the bounded log gets all hashes."""
    from types import SimpleNamespace

    import raylm.engine.core_loop as core_loop

    monkeypatch.setattr(core_loop, "EVENT_LOG_LEN", 1024)
    core = SimpleNamespace(block_manager=SimpleNamespace(hash_events=[]), stats=dict, timing_summary=dict,
                           metrics=SimpleNamespace(snapshot=dict))
    loop = CoreLoop(core, deliver=None)  # never started: _publish is driven by hand
    log = []
    for step in range(300):  # 1,500 events, past a log of 1,024
        events = [(int(i % 3 != 0), step * 10 + i) for i in range(5)]
        core.block_manager.hash_events = list(events)
        log += events
        loop._publish()
    cached = set()
    for op, h in log:
        (cached.add if op else cached.discard)(h)
    assert loop.snapshot(1500)["events"] == [] and loop.snapshot(1 << 62)["events"] == []  # (hashes=False)
    assert loop.snapshot(1490)["events"] == log[-10:]
    assert loop.snapshot(1500 - len(loop._events))["events"] == log[-len(loop._events):]
    assert set(loop.snapshot(1500 - len(loop._events) - 1)["hashes"]) == cached  # behind the log
    assert set(loop.snapshot(-1)["hashes"]) == cached
    assert len(loop._events) == 1024


# ---- through the in-process cluster ------------------------------------------------
def test_stop_string_at_the_edge_stops_the_core_request(llama_dir):
    llm = LLM(llama_dir, max_model_len=128)
    free = llm.generate("the stop test", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    llm.shutdown()
    stop = free.text[10:13]
    assert len(stop) == 3

    async def main():
        cluster = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128))
        try:
            params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, stop=[stop])
            out = await cluster.generate("the stop test", params)
            comp = out.outputs[0]
            assert comp.finish_reason == "stop" and comp.stop_reason == stop
            assert comp.text == free.text[:free.text.index(stop)]
            core = cluster.cores[0]
            wait_until(lambda: not core.requests)  # the abort reached the core
            stats = cluster.stats()
            assert stats["generation_tokens"] < 100  # stopped early, not run to max_tokens
            assert stats["groups"][0]["blocks_in_use"] == 0
            text = (await cluster.metrics_text()).decode()
            assert 'raylm:request_success_total{finished_reason="stop",model_name=' in text
        finally:
            await cluster.shutdown()
    asyncio.run(main())


def test_router_sees_two_messages_per_request_and_none_per_token(llama_dir):
    async def main():
        cluster = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128), num_groups=2)
        try:
            params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
            outs = await asyncio.gather(*[cluster.generate(f"request {i}", params) for i in range(20)])
            assert sum(len(o.outputs[0].token_ids) for o in outs) == 320
            await asyncio.sleep(0.1)  # the batched release
            calls = cluster.ledger.calls
            assert calls["assign"] == 20 and 1 <= calls["release"] <= 20, calls
            assert set(calls) == {"assign", "release"}
            assert not cluster.ledger.ledger
        finally:
            await cluster.shutdown()
    asyncio.run(main())


def test_admission_past_the_queue_bound_and_serving_goes_on(llama_dir):
    import httpx

    from raylm.cluster.openai_api import create_openai_app

    async def main():
        cluster = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128, max_num_seqs=2),
                               max_queued_requests=2)
        app = create_openai_app(cluster)
        body = {"prompt": "long one", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=120) as client:
                rs = await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(8)])
                codes = sorted(r.status_code for r in rs)
                assert codes.count(200) >= 4 and 429 in codes, codes  # 2 run + 2 wait, the rest refused
                refused = next(r for r in rs if r.status_code == 429)
                assert refused.headers["retry-after"] == "1"
                assert "max_queued_requests is 2" in refused.json()["error"]["message"]
                assert refused.json()["error"]["code"] == 429
                again = await client.post("/v1/completions", json=dict(body, max_tokens=4))
                assert again.status_code == 200
        finally:
            await cluster.shutdown()
    asyncio.run(main())
