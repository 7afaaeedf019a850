"""Online serving: the Ray Serve application (ingress replicas -> router -> one engine
core process per worker group) under streaming completions, on random bf16 weights.

    python benchmarks/serving.py --model qwen3-0.6b --num-groups 1
    python benchmarks/serving.py --model qwen3-0.6b --num-groups 2 --num-gpus-per-worker 0.5

The workload of vLLM's figures: token-id prompts and output lengths uniform in
--min-len..--max-len (seed 0), temperature 0.6, `ignore_eos`, streamed with
`stream_options.include_usage`; --num-requests requests closed-loop at --max-concurrency,
then (unless --open-loop-fraction 0) the same requests open-loop, Poisson arrivals at that
fraction of the closed-loop request rate. Clients run in --client-procs processes
(benchmarks/loadgen.py). Reports output tok/s and mean/p50/p99 of TTFT, TPOT,
inter-token latency and end-to-end latency, per group the requests routed and the
fraction of the run it spent in steps, and the process start to the first served
request (one request sent as soon as the app is up; with each engine core's start-up
phases and marks, raylm.cluster.startup). vLLM 0.26.0's figures on one H200 (same workload) stand beside ours. Writes
benchmarks/results/serving-<model>-<G>groups[-<tag>].json (or under $OUT).
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.loadgen import run_load, summarize  # noqa: E402

# vLLM 0.26.0 over HTTP on one H200, this workload (512 requests at concurrency 256).
VLLM_H200 = {"qwen3-0.6b": {"output_tok_per_s": 10394},
             "llama-3.1-8b": {"output_tok_per_s": 9403, "tpot_p50_ms": 21.8, "itl_p99_ms": 74,
                              "ttft_p50_ms": 3550}}
PEER = "vllm-0.26.0"


def closed_loop_batch_bound(output_lens: list[int], concurrency: int) -> float:
    """The largest mean batch (output tokens per step) a closed loop of `concurrency`
    clients can give, whatever the engine: each request gains one token per step, and a
    client sends its next request the step its last one ends. The tail, where fewer than
    `concurrency` requests remain, bounds it (about 161 of 256 for this workload)."""
    free = [0] * concurrency
    heapq.heapify(free)
    makespan = 0
    for n in output_lens:
        end = heapq.heappop(free) + n
        makespan = max(makespan, end)
        heapq.heappush(free, end)
    return sum(output_lens) / max(1, makespan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--num-gpus-per-worker", type=float, default=1.0)
    p.add_argument("--api-server-count", type=int, default=2)
    common.add_workload_args(p)
    p.set_defaults(num_requests=512)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--open-loop-fraction", type=float, default=0.8)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tag", default="")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra engine argument (repeatable), e.g. max_num_seqs=512")
    args = p.parse_args()

    from transformers import AutoConfig

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    common.add_word_tokenizer(cfg_dir, cfg)
    prompts, outputs = common.make_workload(args.num_requests, args.min_len, args.max_len, cfg.vocab_size)

    import ray
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    ray.init(include_dashboard=False)  # as `raylm serve` starts Ray
    # Clients reach the ingress replicas directly on --port (http_port); Serve's proxy sits
    # on the next port, unused here.
    serve.start(http_options={"host": "127.0.0.1", "port": args.port + 1})
    extra = {}
    for kv in args.engine_arg:  # values as JSON (512, true, "x"), else as strings
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except ValueError:
            extra[k] = v
    t = time.perf_counter()
    serve.run(build_app({"model": cfg_dir, "load_format": "dummy", "dtype": "bfloat16",
                         "max_model_len": args.max_model_len, "seed": 0,
                         "gpu_memory_utilization": args.gpu_memory_utilization,
                         "tensor_parallel_size": args.tensor_parallel_size,
                         "num_gpus_per_worker": args.num_gpus_per_worker,
                         "num_groups": args.num_groups, "served_model_name": "bench",
                         "api_server_count": args.api_server_count, "http_port": args.port, **extra}),
              name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{args.port}/v1/completions"

    def body(prompt, n):
        return {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": args.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    # The first request, sent at once (run_load's clients start 2 s after they are spawned).
    first = {"model": "bench", "prompt": prompts[0][:32], "max_tokens": 4, "ignore_eos": True}
    with urllib.request.urlopen(urllib.request.Request(url, json.dumps(first).encode(),
                                                       {"Content-Type": "application/json"}), timeout=600) as resp:
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 4
    startup_s = common.process_age_s()
    warm, _ = run_load(url, [body(prompts[0][:32], 4)] * 4, 4, procs=1)  # warm-up
    assert all(r.get("error") is None for r in warm), warm
    app_s = time.perf_counter() - t
    print(f"app up in {app_s:.0f} s; process start to first served request {startup_s:.0f} s", flush=True)
    router = serve.get_deployment_handle("Router", app_name=APP_NAME)
    # Where the start-up went: each core's own phases, and its marks from this process's start.
    t0 = time.time() - startup_s
    cores_startup = [{"phases_s": m.get("phases"),
                      "marks_s": {k: round(v - t0, 2) for k, v in m["marks"].items()}}
                     for m in router.startup_marks.remote().result() if m["role"].startswith("core")]
    print(f"engine cores' start-up: {cores_startup}", flush=True)
    bodies = [body(pr, o) for pr, o in zip(prompts, outputs)]
    records = []
    # vLLM's figures were measured on an H200: no peer beside a run on another GPU.
    peer = VLLM_H200.get(args.model, {}) if "H200" in common.device_name() else {}
    for mode in ("closed-loop", "open-loop"):
        if mode == "open-loop" and args.open_loop_fraction <= 0:
            break
        rate = None if mode == "closed-loop" else args.open_loop_fraction * records[0]["requests_per_s"]
        before = router.stats.remote().result()
        rows, elapsed = run_load(url, bodies, args.max_concurrency if rate is None else 1 << 20,
                                 procs=args.client_procs, rate=rate)
        after = router.stats.remote().result()
        s = summarize(rows, elapsed)
        assert s["failed"] == 0, s["errors"]
        assert s["output_tokens"] == sum(outputs), (s["output_tokens"], sum(outputs))
        groups = [{"requests_routed": a["requests_routed"] - b["requests_routed"],
                   "steps": a.get("steps", 0) - b.get("steps", 0),
                   "busy_fraction": (a.get("busy_s", 0) - b.get("busy_s", 0)) / elapsed,
                   "between_steps_fraction": (a.get("between_s", 0) - b.get("between_s", 0)) / elapsed,
                   "timing": a.get("timing")}
                  for a, b in zip(after["groups"], before["groups"])]
        rec = common.base_result("serving", os.path.basename(args.model.rstrip("/")))
        rec.update({
            "mode": mode, "request_rate": rate, "num_requests": args.num_requests,
            "max_concurrency": args.max_concurrency if rate is None else None,
            "min_len": args.min_len, "max_len": args.max_len, "temperature": args.temperature,
            "num_groups": args.num_groups, "tensor_parallel_size": args.tensor_parallel_size,
            "attention_backend": extra.get("attention_backend", "auto"),
            "num_gpus_per_worker": args.num_gpus_per_worker, "api_server_count": args.api_server_count,
            "num_gpus": args.num_groups * args.tensor_parallel_size * args.num_gpus_per_worker,
            "http_stack": common.http_stack(),
            **s, "startup_s": startup_s, "cores_startup": cores_startup, "groups": groups,
            "mean_batch": s["output_tokens"] / max(1, sum(g["steps"] for g in groups)),
            "mean_batch_bound": (closed_loop_batch_bound(outputs, args.max_concurrency * args.num_groups)
                                 / args.num_groups if rate is None else None),
            "router_calls": {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in after["calls"]},
            "peer": PEER if peer and rate is None else None,
            "peer_output_tok_per_s": peer.get("output_tok_per_s") if rate is None else None,
            "peer_latency_ms": {k: v for k, v in peer.items() if k != "output_tok_per_s"} if rate is None else None,
        })
        if rec["peer_output_tok_per_s"]:
            rec["ratio_to_peer"] = rec["raylm_output_tok_per_s"] / rec["peer_output_tok_per_s"]
        records.append(rec)
        print(f"{mode}: {s['raylm_output_tok_per_s']:.0f} output tok/s; TTFT p50 {s['ttft_ms']['p50']:.0f} ms, "
              f"TPOT p50 {s['tpot_ms']['p50']:.1f} ms, ITL p99 {s['itl_ms']['p99']:.0f} ms; groups {groups}",
              flush=True)
    stem = f"serving-{os.path.basename(args.model.rstrip('/'))}-{args.num_groups}groups"
    common.save_result(records, stem + (f"-{args.tag}" if args.tag else ""))
    serve.shutdown()  # after the result is saved: a slow shutdown cannot lose it
    ray.shutdown()


if __name__ == "__main__":
    main()
