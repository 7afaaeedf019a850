"""Online serving: the Ray Serve application (OpenAI HTTP ingress -> global scheduler ->
worker groups) under concurrent streaming completions, on random bf16 weights.

    python benchmarks/serving.py --model llama-3.1-8b --num-groups 2
    python benchmarks/serving.py --model llama-3.1-8b --num-groups 1   # the one-group baseline

Every request is a token-id prompt (lengths uniform in --min-len..--max-len, as the
throughput benchmark) streamed back with `ignore_eos`; at most --max-concurrency are in
flight. Reports output tok/s, TTFT and time per output token (mean, p50, p99), and per
worker group the requests routed to it, its steps and the fraction of the run it had a
step on its GPUs. The model gets a word-per-id tokenizer (benchmarks.common), so any id
decodes. Writes benchmarks/results/serving-<model>-<G>groups.json (or under $OUT).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


async def one_request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens,
            "e2e": last - t0}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def drive(base: str, model: str, prompts, outputs, temperature: float, concurrency: int):
    """Send every request (at most `concurrency` at once); (per-request rows, wall time)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def go(p, o):
            async with sem:
                return await one_request(client, f"{base}/v1/completions", {
                    "model": model, "prompt": p, "max_tokens": o, "temperature": temperature,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})

        t = time.perf_counter()
        rows = await asyncio.gather(*(go(p, o) for p, o in zip(prompts, outputs)))
        return rows, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--num-groups", type=int, default=2)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    common.add_workload_args(p)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()

    from transformers import AutoConfig

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    common.add_word_tokenizer(cfg_dir, cfg)
    prompts, outputs = common.make_workload(args.num_requests, args.min_len, args.max_len, cfg.vocab_size)

    import ray
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    t = time.perf_counter()
    serve.run(build_app({"model": cfg_dir, "load_format": "dummy", "dtype": "bfloat16",
                         "max_model_len": args.max_model_len, "seed": 0,
                         "gpu_memory_utilization": args.gpu_memory_utilization,
                         "tensor_parallel_size": args.tensor_parallel_size,
                         "num_groups": args.num_groups, "served_model_name": "bench"}),
              name=APP_NAME, route_prefix="/")
    startup_s = time.perf_counter() - t
    print(f"app up in {startup_s:.0f} s", flush=True)
    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
    asyncio.run(drive(f"http://127.0.0.1:{args.port}", "bench", [prompts[0][:32]], [4], 0.0, 1))  # warm-up
    before = scheduler.stats.remote().result()["groups"]
    rows, elapsed = asyncio.run(drive(f"http://127.0.0.1:{args.port}", "bench", prompts, outputs,
                                      args.temperature, args.max_concurrency))
    after = scheduler.stats.remote().result()["groups"]

    tokens = sum(r["tokens"] for r in rows)
    assert tokens == sum(outputs), (tokens, sum(outputs))
    groups = [{"requests_routed": a["requests_routed"] - b["requests_routed"],
               "steps": a["steps"] - b["steps"],
               "busy_fraction": (a["busy_s"] - b["busy_s"]) / elapsed} for a, b in zip(after, before)]
    ttft = [1e3 * r["ttft"] for r in rows]
    tpot = [1e3 * r["tpot"] for r in rows]
    result = common.base_result("serving", args.model)
    result.update({
        "num_groups": args.num_groups, "tensor_parallel_size": args.tensor_parallel_size,
        "num_gpus": args.num_groups * args.tensor_parallel_size,
        "num_requests": args.num_requests, "max_concurrency": args.max_concurrency,
        "output_tokens": tokens, "time_s": elapsed, "startup_s": startup_s,
        "raylm_output_tok_per_s": tokens / elapsed, "requests_per_s": len(rows) / elapsed,
        "ttft_ms": {"mean": statistics.mean(ttft), "p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
        "tpot_ms": {"mean": statistics.mean(tpot), "p50": pct(tpot, 0.5), "p99": pct(tpot, 0.99)},
        "groups": groups,
        # Compare with the one-group run of this script and with benchmarks/throughput.py
        # (offline, no HTTP) on the same workload.
        "peer": None, "peer_output_tok_per_s": None, "roofline_output_tok_per_s": None,
    })
    print(f"{tokens / elapsed:.0f} output tok/s over HTTP; groups: {groups}", flush=True)
    common.save_result(result, f"serving-{os.path.basename(args.model.rstrip('/'))}-{args.num_groups}groups")
    serve.shutdown()  # after the result is saved: a slow shutdown cannot lose it
    ray.shutdown()


if __name__ == "__main__":
    main()
