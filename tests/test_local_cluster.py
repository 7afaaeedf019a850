"""The cluster in one process (engine cores in threads, the router, the frontend):
prefix-affinity routing, load spreading, streaming, aborts that free blocks, metrics,
failed groups, and two groups whose ranks are Ray actors serving concurrent requests."""
from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raylm import LLM, SamplingParams
from raylm.cluster.local import LocalCluster
from raylm.engine.config import EngineArgs

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def run(coro):
    return asyncio.run(coro)


def _samples(text: bytes) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_until(cond, timeout=30.0):
    """Poll cond() (another thread acts on it) until true; generous for loaded machines."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


async def await_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _metric(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == str(x) for k, x in labels.items()))


def test_prefix_affinity_and_load_spreading(llama_dir):
    async def main():
        sched = LocalCluster(EngineArgs(model=llama_dir, max_model_len=256, block_size=4), num_groups=2)
        try:
            tok = sched.tokenizer
            shared = list(range(10, 10 + 40))  # 10 full blocks of 4 tokens
            first = await sched.generate(shared + [7, 8], GREEDY)
            assert first.finished
            owner = next(i for i, c in enumerate(sched.cores) if c.block_manager.hash_to_block)
            # Later requests sharing the long prefix go to the group that caches it ...
            outs = await asyncio.gather(*[sched.generate(shared + [20 + i], GREEDY) for i in range(4)])
            assert all(o.num_cached_tokens >= 36 for o in outs)
            assert sched.cores[1 - owner].block_manager.prefix_hit_tokens == 0
            assert sched.cores[owner].scheduler.num_steps > 0
            # ... while requests with different prefixes spread over both groups.
            before = [c.counters["prompt_tokens"] for c in sched.cores]
            prompts = [[(31 * i + j) % 300 + 5 for j in range(12)] for i in range(8)]
            await asyncio.gather(*[sched.generate(p, GREEDY) for p in prompts])
            after = [c.counters["prompt_tokens"] for c in sched.cores]
            got = [a - b for a, b in zip(after, before)]
            assert got[0] > 0 and got[1] > 0, got
            assert tok is not None
        finally:
            await sched.shutdown()
    run(main())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_streaming_matches_offline_and_abort_frees_blocks(llama_dir, async_scheduling):
    prompts = ["hello world", "the quick brown fox", "a b c d e f"]
    offline = LLM(llama_dir, max_model_len=256)
    expected = [o.outputs[0].text for o in offline.generate(prompts, GREEDY, use_tqdm=False)]
    offline.shutdown()

    async def main():
        sched = LocalCluster(EngineArgs(model=llama_dir, max_model_len=256,
                                           async_scheduling=async_scheduling), num_groups=1)
        assert sched.cores[0].async_scheduling is async_scheduling
        bm = sched.cores[0].block_manager
        try:
            async def stream_text(p):
                text, last = "", None
                async for out in sched.generate_stream(p, GREEDY):
                    new = out.outputs[0].text
                    assert new.startswith(text)  # cumulative
                    text, last = new, out
                assert last.finished
                return text
            assert await asyncio.gather(*[stream_text(p) for p in prompts]) == expected
            free_before = bm.num_free_blocks

            # 50 streams closed after their first chunk: each aborts and frees its blocks.
            long = SamplingParams(max_tokens=200, ignore_eos=True)

            async def one_chunk(i):
                agen = sched.generate_stream(f"abort me {i}", long)
                async for _ in agen:
                    break
                await agen.aclose()
            await asyncio.gather(*[one_chunk(i) for i in range(50)])
            await await_until(lambda: bm.num_free_blocks == free_before and not sched.cores[0].requests)
            assert not sched.open_request_ids and not sched.outputs.requests
            m = _samples(await sched.metrics_text())
            assert _metric(m, "raylm:request_success_total", finished_reason="abort") == 50
            assert _metric(m, "raylm:request_success_total", finished_reason="length") == 3
            assert _metric(m, "raylm:num_requests_running") == 0
            assert _metric(m, "raylm:kv_cache_usage_perc") == 0
            assert _metric(m, "raylm:time_to_first_token_seconds_count") == 53
            assert _metric(m, "raylm:generation_tokens_total") >= 3 * 6 + 50

            # Bad input raises before anything is queued; the scheduler keeps serving.
            with pytest.raises(ValueError, match="max_model_len"):
                await sched.generate(list(range(5, 300)), GREEDY)
            assert (await sched.generate(prompts[0], GREEDY)).outputs[0].text == expected[0]
        finally:
            await sched.shutdown()
    run(main())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_two_ray_groups_serve_32_concurrent_requests(llama_dir, ray_session, async_scheduling):
    """Both groups get work; with async_scheduling each group's ranks keep one step in
    flight (execute_pipelined) and the text is the same."""
    prompts = [f"request number {i} says" for i in range(32)]
    offline = LLM(llama_dir, max_model_len=128)
    expected = [o.outputs[0].text for o in offline.generate(prompts, GREEDY, use_tqdm=False)]
    offline.shutdown()

    async def main():
        args = EngineArgs(model=llama_dir, max_model_len=128, distributed_executor_backend="ray",
                          async_scheduling=async_scheduling)
        sched = LocalCluster(args, num_groups=2)
        try:
            t0 = time.perf_counter()
            outs = await asyncio.gather(*[sched.generate(p, GREEDY) for p in prompts])
            assert [o.outputs[0].text for o in outs] == expected
            stats = sched.stats()["groups"]
            elapsed = time.perf_counter() - t0
            steps = [s["steps"] for s in stats]
            assert all(s > 0 for s in steps), steps
            assert sum(s["requests_routed"] for s in stats) == 32
            # Busy time: spans with a step on the workers, each counted once.
            assert all(0 < s["busy_s"] <= elapsed for s in stats), (stats, elapsed)
            await sched.check_health()
        finally:
            await sched.shutdown()
    run(main())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failed_group_s_requests_move_and_finish_as_undisturbed(llama_dir, async_scheduling):
    """Group 0's worker dies mid-generation: its requests continue on group 1 by
    recompute, greedy and seeded ones exactly as an undisturbed run; the group restarts
    and serves again; health and metrics tell what happened."""
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    prompts = [f"prompt number {i}" for i in range(8)]
    params = [greedy if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=14,
                                                       ignore_eos=True, presence_penalty=0.5, logprobs=1)
              for i in range(8)]
    offline = LLM(llama_dir, max_model_len=128, async_scheduling=async_scheduling)
    expected = offline.generate(prompts, params, use_tqdm=False)
    offline.shutdown()

    async def main():
        sched = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128, async_scheduling=async_scheduling),
                             num_groups=2)
        try:
            executor = sched.cores[0].executor
            method = "collect" if async_scheduling else "execute"
            real, calls = getattr(executor, method), []

            def dies_at_step_5(arg):
                calls.append(1)
                if len(calls) >= 5:
                    raise RuntimeError("worker died")
                return real(arg)
            setattr(executor, method, dies_at_step_5)
            outs = await asyncio.gather(*[sched.generate(p, sp) for p, sp in zip(prompts, params)])
            for got, want in zip(outs, expected):
                assert got.outputs[0].token_ids == want.outputs[0].token_ids
                assert got.outputs[0].text == want.outputs[0].text
                assert got.outputs[0].finish_reason == "length"
                if want.outputs[0].logprobs is not None:
                    assert len(got.outputs[0].logprobs) == 14
                    for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
                        tok = next(iter(b))
                        assert abs(a[tok].logprob - b[tok].logprob) < 1e-4
            stats = sched.stats()
            assert stats["requests_redispatched"] > 0
            # The group comes back with a new core and serves again.
            await await_until(lambda: sched.ledger.groups[0].state == "serving"
                              and sched.ledger.groups[0].restarts == 1, timeout=120)
            health = await sched.health()
            assert health["status"] == "ok" and [g["state"] for g in health["groups"]] == ["serving"] * 2
            text = (await sched.metrics_text()).decode()
            assert "raylm:requests_redispatched_total" in text and "raylm:group_restarts_total" in text
            more = await asyncio.gather(*[sched.generate(f"after {i}", greedy) for i in range(6)])
            assert all(o.finished for o in more)
            assert sched.cores[0].scheduler.num_steps > 0  # the new core took requests
            for core in sched.cores:
                await await_until(lambda: core.block_manager.num_used_blocks == 0)
        finally:
            await sched.shutdown()
    run(main())


def test_no_serving_group_waits_queue_timeout_then_503(llama_dir):
    """Every group dead: a request waits for one up to queue_timeout, then gets a 503 with
    Retry-After; /health says 503 with each group's state."""
    import httpx

    from raylm.cluster.openai_api import create_openai_app

    async def main():
        sched = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128), queue_timeout=0.5)
        sched._schedule_restart = lambda gi: None  # keep it down
        sched.router_client.restart = None
        sched.ledger.mark_dead(0, "gone")
        app = create_openai_app(sched)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
                assert r.status_code == 503 and time.monotonic() - t0 >= 0.4
                assert r.headers["retry-after"] and r.json()["error"]["code"] == 503
                h = await c.get("/health")
                assert h.status_code == 503
                assert h.json() == {"status": "unavailable",
                                    "groups": [{"id": 0, "state": "dead",
                                                "last_step_age_s": h.json()["groups"][0]["last_step_age_s"]}]}
                # A group that returns within the timeout serves the waiting request.
                sched.queue_timeout = 30
                waiting = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
                await asyncio.sleep(0.3)
                sched.ledger.groups[0].state = "serving"
                r = await waiting
                assert r.status_code == 200
                assert (await c.get("/health")).status_code == 200
        finally:
            await sched.shutdown()
    run(main())


def test_a_slow_stream_gets_the_newest_output_and_loses_nothing(llama_dir):
    """Outputs are cumulative, so a consumer that falls behind is sent only the newest
    one (fewer items), with the same final text and tokens as a prompt consumer gets."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def main():
        sched = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128), num_groups=1)
        try:
            async def consume(delay):
                items = []
                async for out in sched.generate_stream("slow reader", params):
                    items.append(out)
                    await asyncio.sleep(delay)
                return items
            fast = await consume(0)
            slow = await consume(0.05)
        finally:
            await sched.shutdown()
        # The core runs in its own thread and never waits for a reader: even a prompt one may
        # find two steps queued (then it gets their newest), so it sees at most one per token.
        assert len(slow) < len(fast) <= 24
        assert slow[-1].finished and slow[-1].outputs[0].text == fast[-1].outputs[0].text
        assert slow[-1].outputs[0].token_ids == fast[-1].outputs[0].token_ids
    run(main())


def test_ray_groups_start_at_once_and_a_failed_start_shuts_the_others(monkeypatch, llama_dir):
    """Groups on Ray actors are built concurrently (each waits on a barrier only both can
    pass); when one fails to start, the ones that started are shut down and its error is
    raised. In-process groups are built one at a time."""
    import threading

    from raylm.cluster import local as gs

    barrier = threading.Barrier(2, timeout=10)
    made, shut = [], []

    class FakeEngine:
        def __init__(self, args, model=None, fail=False):
            self.fail = fail
            barrier.wait()
            made.append(self)
            if fail:
                raise RuntimeError("group could not be placed")

        def shutdown(self):
            shut.append(self)

    ray_args = EngineArgs(model=llama_dir, distributed_executor_backend="ray")
    model = object()
    monkeypatch.setattr(gs, "EngineCore", FakeEngine)
    assert len(gs.build_cores(ray_args, 2, model)) == 2  # sequential building would break the barrier

    calls = iter([False, True])
    monkeypatch.setattr(gs, "EngineCore", lambda args, model: FakeEngine(args, fail=next(calls)))
    made.clear()
    with pytest.raises(RuntimeError, match="group could not be placed"):
        gs.build_cores(ray_args, 2, model)
    assert len(made) == 2 and shut == [e for e in made if not e.fail]  # the one that started

    order = []

    class Sequential:
        def __init__(self, args, model):
            order.append(threading.current_thread().name)

    monkeypatch.setattr(gs, "EngineCore", Sequential)
    assert len(gs.build_cores(EngineArgs(model=llama_dir), 3, model)) == 3
    assert order == [threading.current_thread().name] * 3
