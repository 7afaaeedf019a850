"""The GPU correctness scripts run on the CPU too, where every path is float32 and must
agree exactly: benchmarks/agreement.py (raylm against transformers on the same weights)
and benchmarks/tp_correctness.py (TP=2 against TP=1 on dummy weights). Each writes the
result file that benchmarks/record.py turns into a RESULTS.md row."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _script(name: str, args: list[str], out_dir) -> str:
    env = dict(os.environ, OUT=str(out_dir), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


def test_agreement_script_on_cpu_is_exact(llama_dir, tmp_path):
    import record

    _script("agreement.py", ["--model", llama_dir, "--device", "cpu", "--num-prompts", "3",
                             "--max-tokens", "6"], tmp_path)
    r = json.load(open(tmp_path / "agreement-llama.json"))
    assert r["median_top2_gap_nats"] > 0
    for name in ("raylm_vs_hf", "raylm_vs_cpu_float32", "hf_vs_cpu_float32"):
        c = r[name]
        assert c["prompts_agreeing_on_first_tokens"] == 3 and c["first_divergence"] == [6, 6, 6]
        assert c["max_abs_logprob_diff_before_divergence"] < 1e-4
    assert r["benchmark"] == "agreement" and r["device"] == "cpu"
    assert "vs HF: 3/3 prompts agree" in record.row(r)
    assert "HF bf16 itself vs CPU float32: 3/3" in record.row(r)


def test_tp_correctness_script_on_cpu(llama_dir, tmp_path):
    import record

    out = _script("tp_correctness.py", ["--model", llama_dir, "--tp-sizes", "1,2", "--num-prompts", "3",
                                        "--max-tokens", "5", "--first", "5", "--max-model-len", "256",
                                        "--max-prompt-len", "60"], tmp_path)
    assert "TP=2 vs TP=1: 3/3 prompts agree" in out
    r = json.load(open(tmp_path / "tp_correctness-llama.json"))
    c = r["vs_reference"]["2"]
    assert c["max_abs_logprob_diff_before_divergence"] < 0.05  # bfloat16 on both sides
    assert "TP=2 vs TP=1: 3/3 prompts agree" in record.row(r)


def test_host_step_measures_both_paths(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_step.py"), "--batch", "8",
                        "--steps", "5", "--vocab-size", "500"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.load(open(tmp_path / "host_step.json"))
    assert r["benchmark"] == "host_step" and [x["wire"] for x in r["rows"]] == ["none", "whole"]
    assert all(x["running"] == 8 and x["host_ms_per_step"] > 0 for x in r["rows"])


def test_fault_script_figures_from_a_made_up_run():
    """benchmarks/fault.py's analysis, without the app (a run takes minutes on 2 cores):
    1 s buckets, the pre-kill mean, the dip, the recovery by a 3 s moving average, the
    restart from /health samples, and failed requests."""
    import fault
    import record

    start = 1000.0
    per_s = [50, 100, 100, 100, 100, 40, 60, 80, 95, 100, 100, 100]
    rows = [{"times": [start + i + 0.5], "counts": [n], "max_tokens": n, "usage": n, "error": None}
            for i, n in enumerate(per_s)]
    series = fault.bucket_series(rows, start, len(per_s))
    assert series == per_s
    rec = fault.recovery(series, kill_at=5.0, warmup=1)
    assert rec["pre_kill_mean_tok_per_s"] == 100 and rec["dip_tok_per_s"] == 40 and rec["dip_at_s"] == 5
    # [7, 10) averages 91.7 >= 90; [6, 9) averages 78.3.
    assert rec["recovered_at_s"] == 7 and rec["recovery_s"] == 2.0
    assert fault.recovery([100] * 3 + [10] * 6, kill_at=3.0, warmup=0)["recovery_s"] is None
    samples = [{"t": start + t, "status": 200, "states": [s, "serving"], "latency_s": 0.01}
               for t, s in ((4.9, "serving"), (5.2, "restarting"), (7.0, "restarting"), (8.4, "serving"))]
    h = fault.restart_times(samples, t_kill=start + 5.0, start_at=start)
    assert abs(h["restart_s"] - 3.2) < 1e-9 and abs(h["detect_s"] - 0.2) < 1e-9
    assert [x["state"] for x in h["health_transitions"]] == ["serving", "restarting", "serving"]
    short = dict(rows[0], usage=10, counts=[10], max_tokens=50)
    counts = fault.request_counts(rows + [short, dict(rows[0], error="HTTP 503: x")])
    assert counts["requests_completed"] == len(rows) and counts["requests_failed"] == 2
    r = {"benchmark": "fault", "model": "m", "device": "cpu", "date": "2026-12-04", "command": "python x",
         "num_groups": 2, "concurrency": 8, "kill_at_s": 5.0, "standin": True, "step_ms": 30.0,
         "pre_kill_mean_tok_per_s": 100.0, "dip_tok_per_s": 40, "recovery_s": 2.0, "restart_s": 3.2,
         "requests_completed": 12, "requests_failed": 0, "requests_redispatched": 4.0}
    assert "back to >= 90 % in 2.0 s; restart 3.2 s" in record.row(r)
    assert record.row(r).startswith("| 2026-12-04 | fault |")


def test_front_door_script_figures_from_a_made_up_run():
    """benchmarks/front_door.py's analysis, without the app: /health latency inside the
    streams' window and the bodies' windows, 413s, and every response >= 500 counted."""
    import front_door
    import record

    t0 = 1000.0
    rows = [{"start": t0 + i * 0.01, "end": t0 + 10 + i * 0.01, "error": None} for i in range(4)]
    rows.append({"start": t0, "end": t0 + 1, "error": "HTTP 503: busy"})
    rows.append({"start": t0, "end": t0 + 2, "error": "{'message': 'x', 'code': 500}"})
    samples = [{"t": t0 - 0.99 + 0.02 * i, "latency_s": 0.002 + 0.0001 * (i % 50), "status": 200}
               for i in range(600)]  # probes every 20 ms, off the windows' edges
    samples[100]["latency_s"] = 0.25  # one slow probe inside the streams' window
    samples[-1]["status"] = 503
    samples += [{"path": "/version", "t": t0 + 5.001 + i, "latency_s": 0.001, "status": 200} for i in range(3)]
    bodies = [{"mode": m, "start": t0 + 2 + i, "end": t0 + 2.5 + i, "sent_bytes": 17 << 20, "status": s}
              for i, (m, s) in enumerate(zip(front_door.MODES, (413, 413, 500)))]
    summary = {"completed": 4, "failed": 2, "errors": ["HTTP 503: busy"], "raylm_output_tok_per_s": 400.0}
    f = front_door.analyse(rows, samples, bodies, summary)
    h = f["health_ms_during_streams"]
    assert h["count"] == 502 and h["max"] == 250.0 and 2.0 <= h["p50"] <= 7.0 and h["p99"] < 250.0
    assert f["health_ms_idle_before"]["count"] == 50
    assert f["version_ms_during_streams"] == {"count": 3, "p50": 1.0, "p99": 1.0, "max": 1.0}
    assert f["health_ms_while_bodies_sent"]["count"] == 3 * 25  # 0.5 s windows, a probe every 20 ms
    assert (f["bodies"], f["bodies_413"], f["bodies_during_streams"]) == (3, 2, 3)
    assert f["responses_5xx"] == 1 + 1 + 1 + 1  # a 503 stream, a 500 event, a 503 probe, a 500 body
    assert f["health_failed_probes"] == 1 and f["body_answers"][0]["sent_mib"] == 17.0
    assert front_door.latency_ms(samples, [(0.0, 1.0)]) == {"count": 0, "p50": None, "p99": None, "max": None}
    r = {"benchmark": "front_door", "model": "m", "device": "cpu (2 cores)", "date": "2026-12-04",
         "command": "python benchmarks/front_door.py", "step_ms": 30.0, "streams": 256, "output_len": 300,
         "load_average_1m_at_start": 1.5, **f}
    assert record.row(r).startswith("| 2026-12-04 | front_door | stand-in, 30 ms steps |")
    section = next(s for s in record.SECTIONS if "front_door" in s.benchmarks)
    (row,) = section.rows(r)
    assert len(row.cells) == len(section.columns) and row.cells[-1] == 4 and row.cells[4] == "2 of 3"


def test_front_door_body_sender_against_the_body_limit():
    """The script's raw-socket sender, all three ways, against limits.front_door served by
    uvicorn (a small limit, so this takes well under a second)."""
    import threading

    import uvicorn

    import front_door
    from raylm.cluster.limits import front_door as door
    from tests.helpers import free_port

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(door(ok, max_request_body_bytes=256 << 10), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        for mode in front_door.MODES:
            out = front_door.send_big_body("127.0.0.1", port, 1 << 20, mode, slow_gap=0.001)
            assert out["status"] == 413 and out["mode"] == mode, out
            assert out["sent_bytes"] > 256 << 10 or mode == "content-length", out
    finally:
        server.should_exit = True
        thread.join(10)


def test_closed_loop_batch_bound():
    """serving.py's bound on the mean batch of a closed loop: with every request gaining a
    token per step, c clients can average at most sum(lengths) / makespan."""
    import serving

    assert serving.closed_loop_batch_bound([10] * 8, 4) == 4.0  # two full waves
    # 2 clients, lengths 10, 1, 1: client A runs 10 steps, B runs 1 then 1; 12 tokens in 10 steps.
    assert serving.closed_loop_batch_bound([10, 1, 1], 2) == 1.2
    # The serving workload (seed 0, 100-1024) at concurrency 256: the tail caps it near 161.
    import common
    _, outputs = common.make_workload(512, 100, 1024, 128256)
    assert 150 < serving.closed_loop_batch_bound(outputs, 256) < 170


def test_startup_script_lays_every_process_on_one_timeline(llama_dir, tmp_path):
    """benchmarks/startup.py on the CPU: the driver's steps and the marks of the router,
    the engine core and both ingress replicas, in the order the start-up takes them (the
    router starts the core before its own model config), and a RESULTS.md row; the measured
    process is not the one that prepared the model folder."""
    import socket

    import record

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _script("startup.py", ["--model", llama_dir, "--engine-arg", "device=\"cpu\"", "--engine-arg",
                           "max_num_batched_tokens=256", "--max-model-len", "256", "--port", str(port),
                           "--tag", "t"], tmp_path)
    r = json.load(open(tmp_path / f"startup-{os.path.basename(llama_dir)}-t.json"))
    t = {}
    for x in r["timeline"]:
        t.setdefault((x["who"].split(" ")[0], x["mark"]), []).append(x["t_s"])
    assert len(t[("ingress", "init_end")]) == 2 and len(t[("core-0", "engine_built")]) == 1
    order = [("driver", "serve_start"), ("router", "init_start"), ("router", "cores_starting"),
             ("core-0", "process_start"), ("core-0", "engine_built"), ("router", "cores_ready"),
             ("driver", "serve_run"), ("driver", "first_request")]
    times = [t[k][0] for k in order]
    assert times == sorted(times), list(zip(order, times))
    assert abs(r["startup_s"] - max(x["t_s"] for x in r["timeline"])) < 0.01 and r["startup_s"] > 0
    # The measured process imported what `raylm serve` does before serving: not torch or transformers
    # (the benchmark's own preparation ran before it, in another process).
    assert r["driver_imported_before_first_request"] == [] and "--prepared" not in r["command"]
    # The engine's three phases, where the last went (on the CPU: the KV cache alone, no graphs),
    # and the rest of its build, before the load and after the graphs.
    phases = r["core_phases_s"][0]
    assert set(phases) == {"load_s", "profile_s", "kv_cache_and_graphs_s", "kv_cache_s", "before_load_s",
                           "model_config_s", "after_graphs_s", "gc_freeze_s", "model_config.imports_s",
                           "model_config.hf_config_s", "model_config.model_class_s",
                           "model_config.eos_and_generation_s", "model_config.sampling_defaults_s"}
    assert all(v >= 0 for v in phases.values())
    assert "process start to first served request" in record.row(r)
    (row,) = record._startup(r)
    assert row.cells[-1] == f"{r['startup_s']:.1f}"


def test_sampling_script_on_cpu(tmp_path):
    """benchmarks/sampling.py: one row per generation-config setting, the masks of raylm's
    filter and HF's warpers compared row by row, and record.py's rows for it."""
    import record

    _script("sampling.py", ["--device", "cpu", "--batch", "8", "--vocab", "2000", "--iters", "1"], tmp_path)
    r = json.load(open(tmp_path / "sampling-cpu.json"))
    assert r["benchmark"] == "sampling" and r["device"].startswith("cpu") and r["peer"].startswith("transformers")
    assert [x["top_k"] for x in r["rows"]] == [20, 0, 50]
    for x in r["rows"]:
        assert x["raylm_ms"] > 0 and x["peer_ms"] > 0 and 0 <= x["rows_with_the_same_kept_tokens"] <= 8
    assert r["rows"][2]["rows_with_the_same_kept_tokens"] == 8  # top-k alone: no rounding at stake
    assert "Qwen3 generation config: raylm" in record.row(r)
    assert len(record._sampling(r)) == 3


def test_attention_tile_sweep_on_cpu(tmp_path):
    """benchmarks/attention_tiles.py --smoke: every tile variant and the baseline kernels (here
    the kernels themselves, loaded from their files) agree with the first variant on each shape."""
    kernels = os.path.join(ROOT, "raylm", "kernels", "attention")
    out = _script("attention_tiles.py", ["--smoke", "--baseline-prefill", os.path.join(kernels, "prefill.py"),
                                         "--baseline-decode", os.path.join(kernels, "decode.py")], tmp_path)
    r = json.load(open(tmp_path / "attention_tiles.json"))
    assert r["benchmark"] == "attention_tiles" and r["baseline_prefill"].endswith("prefill.py")
    assert {(x["op"], x["variant"]) for x in r["rows"]} == {
        (op, v) for op in ("prefill", "decode") for v in ("baseline", "default", "tiles")}
    for x in r["rows"]:
        assert x["us"] > 0 and x["max_abs_diff_vs_first"] < 1e-4, x
    assert out.count("== ") == 6  # a best-of line per op, model and shape


def test_load_generator_clock_starts_when_its_clients_are_up():
    """loadgen.run_load's client processes are spawned (each imports the caller's module,
    which takes seconds on a busy machine): the measured window runs from the first request
    sent to the last response's end, so their start-up is not counted as serving time."""
    import threading

    import uvicorn

    import loadgen
    from tests.helpers import free_port

    async def sse(scope, receive, send):  # three text chunks, then usage, as /v1/completions streams
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        usage = {"choices": [], "usage": {"completion_tokens": 3}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sse, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        t0 = time.time()
        rows, elapsed = loadgen.run_load(f"http://127.0.0.1:{port}/v1/completions", [{"prompt": "x"}] * 8, 4,
                                         procs=2)
        wall = time.time() - t0
    finally:
        server.should_exit = True
        thread.join(10)
    s = loadgen.summarize(rows, elapsed)
    assert s["completed"] == 8 and s["output_tokens"] == 24, s
    starts, ends = [r["start"] for r in rows], [r["end"] for r in rows]
    assert elapsed == max(ends) - min(starts)
    assert min(starts) > t0 and elapsed < wall
    # Both clients were up before the clock started: their first requests left together.
    assert max(starts[:2] + starts[4:6]) - min(starts) < 1.0, starts


def test_load_generator_splits_events_across_reads():
    """loadgen.sse_batches splits the stream on the blank line that ends an event, not on
    the network's reads: an event cut across reads parses once whole, the events of one read
    come as one batch, and [DONE] is no chunk."""
    import loadgen

    class Content:
        def __init__(self, reads):
            self.reads = reads

        async def iter_any(self):
            for r in self.reads:
                yield r

    class Resp:
        content = Content([b'data: {"a": 1}\n\ndata: {"a"', b': 2}\n', b'\ndata: {"a": 3}\n\ndata: [DONE]\n\n'])

    async def collect(gen):
        return [x async for x in gen]

    assert asyncio.run(collect(loadgen.sse_batches(Resp()))) == [[{"a": 1}], [{"a": 2}, {"a": 3}]]
    assert asyncio.run(collect(loadgen.sse_chunks(Resp()))) == [{"a": 1}, {"a": 2}, {"a": 3}]
    Resp.content = Content([b'data: {"a": 4}'])  # a last event with no blank line after it
    assert asyncio.run(collect(loadgen.sse_chunks(Resp()))) == [{"a": 4}]
