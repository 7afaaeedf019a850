"""What one Ray round trip costs per decode step, on a tiny test checkpoint where the
model's own work is small: median wall time of a one-token decode step for a batch of
requests run (a) in-process, (b) through RayExecutor at TP=1 and (c) at TP=2, next to
(d) a bare actor round trip carrying the same msgpack bytes to a no-op method,
(e) the same no-op through a Ray compiled graph, (f) the real Worker.execute driven
by a compiled graph instead of one actor task per rank per step, (g) BroadcastExecutor
at TP=2 (rank 0 in this process, rank 1 an actor fed by a gloo broadcast: no Ray task
per step), synchronous and as launch + collect, timed in turn with RayExecutor at TP=2
(one step of each per iteration, so a shared box's load weighs on both alike), and
(h) the broadcast alone: this
process sends the plan to an actor over gloo, which answers with a one-byte broadcast
(a round trip), for three ways of sending bytes: a fixed 4 KiB head holding the length
and the message (what the executor uses), a length then the payload, and
broadcast_object_list.

    .venv/bin/python benchmarks/ray_overhead.py [--batch 8] [--iters 200]

Prints a table and writes benchmarks/results/ray_overhead.json; `python
benchmarks/record.py --write` then regenerates the tables in benchmarks/RESULTS.md."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import msgpack  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raylm.engine.broadcast_executor import BroadcastExecutor  # noqa: E402
from raylm.engine.ray_executor import RayExecutor  # noqa: E402
from raylm.workers import parallel_state  # noqa: E402
from raylm.workers.worker import Worker  # noqa: E402
from raylm.workers.loader import load_config  # noqa: E402
from raylm.workers.messages import NewRequest, SamplingOptions, SeqChunk, StepPlan, StepResult  # noqa: E402
from raylm.workers.model_runner import ModelRunner  # noqa: E402
from tests.helpers import make_checkpoint  # noqa: E402

BLOCK_SIZE = 16
PROMPT_LEN = 32


def plans(batch: int) -> tuple[StepPlan, StepPlan]:
    """A prefill of `batch` prompts, then the decode step that is timed (one token each,
    no new blocks: the workers hold the tables from the prefill)."""
    blocks = -(-(PROMPT_LEN + 1) // BLOCK_SIZE)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    sampling = SamplingOptions(temperature=0.0, eos_token_ids=[1])
    prompt = [5 + (i % 200) for i in range(PROMPT_LEN)]
    prefill = StepPlan(
        seqs=[SeqChunk(f"r{i}", prompt, 0, tables[i], True) for i in range(batch)],
        new_requests=[NewRequest(f"r{i}", prompt, sampling) for i in range(batch)])
    decode = StepPlan(seqs=[SeqChunk(f"r{i}", [7], PROMPT_LEN, [], True) for i in range(batch)])
    return prefill, decode


def timed(fn, iters: int, warmup: int = 10) -> dict:
    """Median/p10/p90 wall time of fn(); where fn returns a StepResult, also the median
    time the runner itself reported (execute_time_s: inside the worker, rank 0)."""
    return timed_in_turn({"fn": fn}, iters, warmup)["fn"]


def timed_in_turn(fns: dict, iters: int, warmup: int = 10) -> dict:
    """`timed` for several functions called in turn, one of each per iteration, so that
    others' load on a shared box weighs on each alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    inside = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            out = fn()
            times[k].append((time.perf_counter() - t) * 1e3)
            if isinstance(out, StepResult) and out.execute_time_s is not None:
                inside[k].append(out.execute_time_s * 1e3)
    stats = {}
    for k, ts in times.items():
        ts.sort()
        stats[k] = {"median_ms": round(statistics.median(ts), 3),
                    "p10_ms": round(ts[len(ts) // 10], 3),
                    "p90_ms": round(ts[len(ts) * 9 // 10], 3)}
        if inside[k]:
            stats[k]["in_runner_median_ms"] = round(statistics.median(inside[k]), 3)
    return stats


@ray.remote(num_cpus=0.5)
class Echo:
    """A no-op step: decodes nothing, returns a result-sized reply."""

    def __init__(self, reply: bytes):
        self.reply = reply

    def noop(self, wire: bytes) -> bytes:
        return self.reply


def free_cpus_wait(timeout_s: float = 10.0) -> None:
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.05)


def compiled_execute(ex: RayExecutor, wire: bytes, iters: int) -> dict:
    """Worker.execute on every rank through a Ray compiled graph (shared-memory channels
    instead of a task per rank per step)."""
    from ray.dag import InputNode, MultiOutputNode

    try:
        with InputNode() as inp:
            dag = MultiOutputNode([w.execute.bind(inp) for w in ex.workers])
        cdag = dag.experimental_compile()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    try:
        def step():
            out = ray.get(cdag.execute(wire))[0]
            return StepResult.from_wire(msgpack.unpackb(out))
        return timed(step, iters)
    finally:
        cdag.teardown()


CHANNELS = ("head_4k", "length_then_payload", "broadcast_object_list")


def channel_send(how: str, message: Optional[bytes]) -> Optional[bytes]:
    """Rank 0 passes the message, rank 1 None and gets it back, the `how` way."""
    import torch.distributed as dist

    group = parallel_state._CPU_GROUP
    if how == "head_4k":
        return parallel_state.broadcast_bytes(message)
    if how == "broadcast_object_list":
        box = [message]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]
    length = torch.tensor([len(message) if message is not None else 0], dtype=torch.int64)
    dist.broadcast(length, src=0, group=group)
    payload = (torch.frombuffer(bytearray(message), dtype=torch.uint8) if message is not None
               else torch.empty(int(length), dtype=torch.uint8))
    dist.broadcast(payload, src=0, group=group)
    return bytes(payload.numpy())


def channel_ack() -> None:
    import torch.distributed as dist

    dist.broadcast(torch.zeros(1, dtype=torch.uint8), src=1, group=parallel_state._CPU_GROUP)


@ray.remote(num_cpus=0.5)
class ChannelPeer:
    """Rank 1 of a two-rank gloo group: receives messages, answers each with one byte."""

    def join(self, init_method: str) -> None:
        torch.set_num_threads(1)
        parallel_state.init_tensor_parallel(1, 2, init_method, "cpu", cpu_group_timeout_s=60)

    def echo(self, how: str, n: int) -> int:
        size = 0
        for _ in range(n):
            size = len(channel_send(how, None))
            channel_ack()
        return size


def broadcast_channels(wire: bytes, iters: int, warmup: int = 10) -> dict:
    """(h): each way of sending the plan, one round trip (plan out, one byte back) per step."""
    peer = ChannelPeer.remote()
    init_method = f"tcp://127.0.0.1:{Worker.free_port()}"
    joined = peer.join.remote(init_method)
    parallel_state.init_tensor_parallel(0, 2, init_method, "cpu", cpu_group_timeout_s=60)
    ray.get(joined)
    out = {}
    try:
        for how in CHANNELS:
            echoed = peer.echo.remote(how, warmup + iters)

            def round_trip():
                channel_send(how, wire)
                channel_ack()
            out[f"h_broadcast_channel_{how}"] = timed(round_trip, iters, warmup)
            assert ray.get(echoed) == len(wire)
    finally:
        parallel_state.destroy_tensor_parallel()
        ray.kill(peer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    load_at_start = round(os.getloadavg()[0], 2)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=True, configure_logging=False)
    tmp = tempfile.mkdtemp(prefix="raylm-bench-")
    model_dir = make_checkpoint(os.path.join(tmp, "llama"), "llama")
    cfg = load_config(model_dir)
    prefill, decode = plans(args.batch)
    num_blocks = args.batch * -(-(PROMPT_LEN + 1) // BLOCK_SIZE)
    wire = msgpack.packb(decode.to_wire())
    results: dict[str, dict] = {}

    # (a) in-process: the ModelRunner alone, no encoding.
    runner = ModelRunner(model_dir, cfg, torch.float32, "cpu", BLOCK_SIZE)
    runner.allocate_kv_cache(num_blocks)
    runner.execute(prefill)
    reply = msgpack.packb(runner.execute(decode).to_wire())
    results["a_in_process"] = timed(lambda: runner.execute(decode), args.iters)
    runner.shutdown()

    # (b, c) RayExecutor: encode, ship, run on every rank, fetch rank 0's result, decode.
    for tp, key in ((1, "b_ray_executor_tp1"), (2, "c_ray_executor_tp2")):
        ex = RayExecutor(model_dir, cfg, torch.float32, "cpu", BLOCK_SIZE, "torch", "auto", 0,
                         tensor_parallel_size=tp)
        ex.allocate_kv_cache(num_blocks)
        ex.execute(prefill)
        results[key] = timed(lambda: ex.execute(decode), args.iters)
        results[key]["torch_threads_per_rank"] = ex.worker_info()[0]["num_threads"]
        # (f) the same Worker.execute driven by a compiled graph instead of actor calls.
        results[f"f_compiled_graph_worker_tp{tp}"] = compiled_execute(ex, wire, args.iters)
        ex.shutdown()
        free_cpus_wait()

    # (g) BroadcastExecutor: rank 0 here, rank 1 an actor reading gloo broadcasts; timed
    # in turn with a RayExecutor at TP=2 (the same minutes' load on both).
    threads = torch.get_num_threads()
    ray_ex = RayExecutor(model_dir, cfg, torch.float32, "cpu", BLOCK_SIZE, "torch", "auto", 0,
                         tensor_parallel_size=2)
    ex = BroadcastExecutor(model_dir, cfg, torch.float32, "cpu", BLOCK_SIZE, "torch", "auto", 0,
                           tensor_parallel_size=2)
    for e in (ray_ex, ex):
        e.allocate_kv_cache(num_blocks)
        e.execute(prefill)
    results.update(timed_in_turn({
        "g_broadcast_executor_tp2": lambda: ex.execute(decode),
        "g_broadcast_executor_tp2_launch_collect": lambda: ex.collect(ex.launch(decode)),
        "g_ray_executor_tp2_in_turn": lambda: ray_ex.execute(decode)}, args.iters))
    for key, e in (("g_broadcast_executor_tp2", ex), ("g_broadcast_executor_tp2_launch_collect", ex),
                   ("g_ray_executor_tp2_in_turn", ray_ex)):
        results[key]["torch_threads_per_rank"] = e.worker_info()[0]["num_threads"]
    ex.shutdown()
    ray_ex.shutdown()
    torch.set_num_threads(threads)
    free_cpus_wait()

    # (h) the broadcast alone, three ways of sending the plan's bytes.
    results.update(broadcast_channels(wire, args.iters))
    free_cpus_wait()

    # (d) bare actor round trips with the same bytes: to one actor, and the TP=2 pattern
    # (two actors, wait for both, fetch the first) with the bytes inline or ray.put once.
    actors = [Echo.remote(reply) for _ in range(2)]
    ray.get([a.noop.remote(b"") for a in actors])
    results["d_actor_noop_inline"] = timed(lambda: ray.get(actors[0].noop.remote(wire)), args.iters)

    def two_ranks(put: bool):
        arg = ray.put(wire) if put else wire
        refs = [a.noop.remote(arg) for a in actors]
        pending = refs
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
        return ray.get(refs[0])

    results["d_actor_noop_2_actors_inline"] = timed(lambda: two_ranks(False), args.iters)
    results["d_actor_noop_2_actors_put_once"] = timed(lambda: two_ranks(True), args.iters)

    # (e) compiled graphs: the same no-op over Ray's shared-memory channels.
    from ray.dag import InputNode, MultiOutputNode

    for n, key in ((1, "e_compiled_graph_noop"), (2, "e_compiled_graph_noop_2_actors")):
        try:
            with InputNode() as inp:
                dag = (actors[0].noop.bind(inp) if n == 1
                       else MultiOutputNode([a.noop.bind(inp) for a in actors]))
            cdag = dag.experimental_compile()
            try:
                results[key] = timed(lambda: ray.get(cdag.execute(wire)), args.iters)
            finally:
                cdag.teardown()
        except Exception as exc:  # report, do not hide, what failed
            results[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    for a in actors:
        ray.kill(a)

    rows = [(k, v) for k, v in results.items()]
    print(f"\none-token decode step, batch {args.batch}, prompt {PROMPT_LEN}, tiny llama "
          f"(hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers), plan {len(wire)} B, "
          f"{args.iters} iterations\n")
    print(f"{'path':34s} {'median ms':>10s} {'p10 ms':>8s} {'p90 ms':>8s} {'in runner ms':>13s}")
    for k, v in rows:
        if "error" in v:
            print(f"{k:34s} {v['error']}")
        else:
            inside = v.get("in_runner_median_ms")
            print(f"{k:34s} {v['median_ms']:10.3f} {v['p10_ms']:8.3f} {v['p90_ms']:8.3f} "
                  f"{'' if inside is None else f'{inside:13.3f}'}")
    med = {k: v.get("median_ms") for k, v in results.items()}
    derived = {"ray_tp1_minus_in_process_ms": round(med["b_ray_executor_tp1"] - med["a_in_process"], 3)}
    cg = med.get("e_compiled_graph_noop")
    if cg is not None:
        derived["compiled_graph_vs_actor_call_ms"] = round(cg - med["d_actor_noop_inline"], 3)
        derived["cheaper_noop_round_trip"] = ("compiled graph" if cg < med["d_actor_noop_inline"]
                                              else "actor call")
    # What a step costs beyond rank 0's runner (its model, sampling): the transport.
    for key, name in (("g_ray_executor_tp2_in_turn", "ray_tp2"),
                      ("g_broadcast_executor_tp2", "broadcast_tp2")):
        derived[f"{name}_outside_runner_ms"] = round(
            med[key] - results[key]["in_runner_median_ms"], 3)
    # Ray's TP=2 step timed in turn with the broadcast one: the fair comparison.
    ray_tp2 = med["g_ray_executor_tp2_in_turn"]
    derived["broadcast_tp2_minus_ray_tp2_ms"] = round(med["g_broadcast_executor_tp2"] - ray_tp2, 3)
    derived["cheaper_tp2_executor"] = "broadcast" if med["g_broadcast_executor_tp2"] < ray_tp2 else "ray"
    channels = {how: med[f"h_broadcast_channel_{how}"] for how in CHANNELS}
    derived["cheapest_broadcast_channel"] = min(channels, key=channels.get)
    print("\n" + json.dumps(derived))

    if args.no_write:
        return
    command = "python benchmarks/ray_overhead.py " + " ".join(sys.argv[1:])
    record = {"benchmark": "ray_overhead", "date": datetime.date.today().isoformat(),
              "device": "cpu (2 cores)", "command": command.strip(),
              "config": {"batch": args.batch, "prompt_len": PROMPT_LEN, "iters": args.iters,
                         "model": "tests.helpers llama (hidden 64, 2 layers, vocab 320)",
                         "plan_bytes": len(wire), "ray": ray.__version__, "torch": torch.__version__,
                         # Others' work on a shared box shows up here and in the p90s.
                         "loadavg_1m_at_start": load_at_start},
              "results": results, "derived": derived}
    record["config"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ray_overhead.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
