"""distributed_executor_backend="ray_broadcast": rank 0 in this process (or the engine
core actor's), rank 1 a Ray actor fed each step by a gloo broadcast, no Ray task per
step. TP=2 gives TP=1's and transformers' greedy tokens, synchronously and with async
scheduling; a 2-rank group serves through the in-process cluster and the Serve app (its
core actor holding rank 0); killing rank 1 fails the group with a clear error instead of
hanging; shutdown leaves no actors or placement groups."""
import asyncio
import time

import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.engine.broadcast_executor import BroadcastExecutor
from raylm.engine.config import EngineArgs
from raylm.workers import parallel_state
from tests.test_tp import (COMMON, abort_one_mid_flight, assert_same_tokens_and_logprobs, check_hf, generate,
                           prompts_of, wait_for_free_cpus)

BACKEND = dict(tensor_parallel_size=2, distributed_executor_backend="ray_broadcast")
TEXT = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def live_placement_groups(ray) -> list:
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def rank_actors(ray) -> list:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rank" in a["name"]]


def assert_all_released(ray, timeout_s=30.0):
    """No rank actor, no placement group, every CPU free again."""
    deadline = time.monotonic() + timeout_s
    while live_placement_groups(ray) or rank_actors(ray):
        assert time.monotonic() < deadline, (live_placement_groups(ray), rank_actors(ray))
        time.sleep(0.2)
    wait_for_free_cpus(ray, timeout_s)
    assert not torch.distributed.is_initialized() and parallel_state.get_tp_size() == 1


@pytest.mark.parametrize("arch,extra", [
    ("llama", dict(async_scheduling=False)),
    # Chunked prefill over mixed steps, the ranks running each step as it arrives.
    ("qwen3", dict(async_scheduling=True, max_num_batched_tokens=16, block_size=4)),
])
def test_tp2_matches_tp1_and_hf(arch, extra, checkpoint_dirs, ray_session):
    d = checkpoint_dirs[arch]
    prompts = prompts_of([3, 17, 40, 9])
    tp1 = LLM(d, **COMMON, **extra)
    ref = generate(tp1, prompts)
    tp1.shutdown()
    threads = torch.get_num_threads()
    llm = LLM(d, **BACKEND, **COMMON, **extra)
    engine = llm.llm_engine
    assert isinstance(engine.executor, BroadcastExecutor)
    assert engine.async_scheduling is extra["async_scheduling"]
    outs = generate(llm, prompts)
    check_hf(d, outs, prompts)
    assert_same_tokens_and_logprobs(outs, ref)

    info = engine.executor.worker_info()
    assert [i["rank"] for i in info] == [0, 1]
    assert all(i["num_heads"] == engine.hf_config.num_attention_heads // 2 for i in info)
    # A collective outside the step loop reaches rank 1 as a message too.
    assert engine.executor.profile_all_reduce(4, iters=2) > 0
    if extra["async_scheduling"]:  # an abort mid-flight leaves the others alone
        done = abort_one_mid_flight(engine, prompts[:3])
        assert done["a2"].outputs[0].token_ids == outs[2].outputs[0].token_ids
    llm.shutdown()
    assert torch.get_num_threads() == threads  # rank 0's share of the cores is given back
    assert_all_released(ray_session)


def test_start_up_error_leaves_nothing_behind(llama_dir, tmp_path, ray_session):
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(llama_dir, d, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(Exception, match="has no .safetensors weights"):
        LLM(str(d), **BACKEND, **COMMON)
    assert_all_released(ray_session)
    # The process may hold a group again.
    llm = LLM(llama_dir, **BACKEND, **COMMON)
    prompts = prompts_of([5], seed=4)
    check_hf(llama_dir, generate(llm, prompts), prompts)
    llm.shutdown()
    assert_all_released(ray_session)


def test_local_cluster_serves_then_a_dead_rank_fails_the_group(llama_dir, ray_session):
    """Two requests through the in-process cluster give TP=1's text; with rank 1's actor
    killed the group's next step fails at once with an error naming the lost rank (the
    request fails with it, or is served by a restarted group); shutdown releases
    everything. A second group in the same process is refused (rank 0 and the process
    group are this process's)."""
    from raylm.cluster.local import LocalCluster

    prompts = ["the quick brown fox", "request number 2 says"]
    offline = LLM(llama_dir, max_model_len=128)
    expected = [o.outputs[0].text for o in offline.generate(prompts, TEXT, use_tqdm=False)]
    offline.shutdown()

    async def main():
        sched = LocalCluster(EngineArgs(model=llama_dir, max_model_len=128, **BACKEND))
        try:
            executor = sched.cores[0].executor
            assert isinstance(executor, BroadcastExecutor)
            outs = await asyncio.gather(*[sched.generate(p, TEXT) for p in prompts])
            assert [o.outputs[0].text for o in outs] == expected
            with pytest.raises(RuntimeError, match="one group per process"):
                LLM(llama_dir, **BACKEND, **COMMON)

            loop = sched.clients[0].loop
            ray_session.kill(executor.workers[0], no_restart=True)
            t0 = time.monotonic()
            # Unloaded the step fails in ~30 ms (gloo sees the closed connection, Ray
            # names the dead actor; up to 1 s is allowed for that); the wait allows far
            # more than 10x that and stays below the gloo timeout (60 s), so a hang shows.
            try:
                await asyncio.wait_for(sched.generate("after the kill", TEXT), timeout=50)
            except asyncio.TimeoutError:
                raise AssertionError("the group hung after losing a rank") from None
            except Exception as exc:
                assert "worker group failed" in str(exc) and "lost a rank" in str(exc), exc
            assert time.monotonic() - t0 < 50
            assert isinstance(loop.error, RuntimeError)
            assert "lost a rank (rank 1: ActorDiedError)" in str(loop.error), loop.error
        finally:
            await sched.shutdown()
    asyncio.run(main())
    assert_all_released(ray_session)


def test_serve_app_core_actor_holds_rank_0(llama_dir, ray_session):
    """build_app at tensor_parallel_size=2: the group's placement group has one bundle
    per rank, the core actor holds rank 0 (only rank 1 is an actor of its own), the text
    equals TP=1's; deleting the app leaves no actors or placement groups."""
    from ray import serve

    from raylm.cluster.app import build_app
    from tests.helpers import free_port

    offline = LLM(llama_dir, max_model_len=128)
    expected = offline.generate(["the quick brown fox"], TEXT, use_tqdm=False)[0].outputs[0].text
    offline.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        serve.run(build_app({"model": llama_dir, "max_model_len": 128, "max_num_seqs": 8,
                             "tensor_parallel_size": 2}), name="raylm-tp2", route_prefix="/tp2")
        handle = serve.get_app_handle("raylm-tp2")
        out = handle.generate.remote("the quick brown fox", TEXT).result(timeout_s=120)
        assert out.finished and out.outputs[0].text == expected
        groups = live_placement_groups(ray_session)
        assert len(groups) == 1 and len(groups[0]["bundles"]) == 2, groups
        assert [n.rsplit("-", 1)[1] for n in rank_actors(ray_session)] == ["rank1"]
    finally:
        serve.delete("raylm-tp2")
        serve.shutdown()
    assert_all_released(ray_session, timeout_s=60)


def _broadcast_ranks(rank: int, port: int, out) -> None:
    """One of two gloo ranks: rank 0's messages, short (in the head) and long (a second
    broadcast), over the message group and over the TP group."""
    parallel_state.init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=60,
                                        cpu_group_timeout_s=60)
    try:
        got = []
        for msg in (b"", b"step", bytes(range(256)) * 40):  # 0, 4 and 10,240 bytes
            got.append(parallel_state.broadcast_bytes(msg if rank == 0 else None))
            got.append(parallel_state.broadcast_from_first_bytes(msg if rank == 0 else None, "cpu"))
        out.put((rank, got))
    finally:
        parallel_state.destroy_tensor_parallel()


def test_byte_messages_reach_every_rank_whole():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_ranks, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    want = [m for m in (b"", b"step", bytes(range(256)) * 40) for _ in (0, 1)]
    assert results[0] == want and results[1] == want
