"""Recovery from a killed worker group: output throughput over time on the Serve app
while group 0's engine core process is SIGKILLed mid-run, and how long the app takes to
serve at full throughput again.

    python benchmarks/fault.py --tag cpu-2cores                   # no GPU: the stand-in model
    python benchmarks/fault.py --num-groups 2 --tag h200          # a GPU per group, random weights

The load is closed-loop streaming for --duration seconds: --concurrency streams stay open
(from --client-procs client processes), each sending a new request (--prompt-len token
ids, --output-len tokens, ignore_eos, temperature 0.6) when its last one ends; the first
request of stream k asks for a share k/concurrency of --output-len tokens, so the streams'
requests do not all end together. Every content chunk's arrival is recorded with the
number of tokens it carries: the words of its text (the benchmark's word tokenizer
decodes each token id to one word), checked against the stream's usage.completion_tokens.
At --kill-at seconds group 0's core process gets SIGKILL; /health is polled every 0.2 s
for when group 0 leaves "serving" and when it serves again.

Each group runs at most --max-num-seqs sequences (default: concurrency / num_groups, so
the groups are full before the kill and losing one costs its share: the stand-in's step
time does not grow with the batch, and one group could otherwise carry every stream).

Figures: output tok/s in 1 s buckets (the series; t = 0 when the load starts), the mean
over the buckets from --warmup to the kill, the dip (lowest bucket from the kill on), the
recovery time (from the kill to the first bucket start t after which every 3 s moving
average over [t, t + 3) stays >= 90 % of the pre-kill mean), the group's restart time
(not serving -> serving per /health), requests completed and failed (a request fails on
an HTTP error, an error chunk, or fewer tokens than it asked for; the run exits 1 when any
failed) and requests re-dispatched (raylm:requests_redispatched_total from /metrics).
Writes benchmarks/results/fault-<tag>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loadgen import sse_chunks  # noqa: E402
from tests.helpers import free_port  # noqa: E402

STANDIN = "raylm.engine.standin_executor:StandInExecutor"
HEALTH_PERIOD_S = 0.2
MOVING_AVERAGE_S = 3
RECOVERED_FRACTION = 0.9


# ---- the client processes -----------------------------------------------------------------------
async def _request(session, url: str, body: dict) -> dict:
    """One streamed completion: each content chunk's (time, tokens) and the usage."""
    start = time.time()
    times, counts, usage, error = [], [], None, None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                async for chunk in sse_chunks(resp):
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        times.append(time.time())
                        counts.append(len(chunk["choices"][0]["text"].split()))
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
                    if chunk.get("error"):
                        error = str(chunk["error"])[:200]
    except Exception as exc:  # connection reset, ...
        error = f"{type(exc).__name__}: {exc}"[:200]
    return {"start": start, "end": time.time(), "max_tokens": body["max_tokens"], "times": times,
            "counts": counts, "usage": usage, "error": error}


async def _streams(url: str, streams: list[int], concurrency: int, prompt_len: int, output_len: int,
                   start_at: float, stop_at: float) -> list[dict]:
    import aiohttp

    rows: list[dict] = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def stream(k: int) -> None:
            rng = random.Random(k)
            first = True
            while time.time() < stop_at:
                n = max(1, round(output_len * (k + 1) / concurrency)) if first else output_len
                first = False
                body = {"model": "bench", "prompt": [rng.randrange(10, 1000) for _ in range(prompt_len)],
                        "max_tokens": n, "ignore_eos": True, "temperature": 0.6, "stream": True,
                        "stream_options": {"include_usage": True}}
                rows.append(await _request(session, url, body))

        await asyncio.gather(*(stream(k) for k in streams))
    return rows


def _client(url, streams, concurrency, prompt_len, output_len, duration, ready, go, start_value, results):
    """A client process: import, say ready, wait for the start time, run its streams
    until start + duration (letting the last requests finish), send back its rows."""
    import aiohttp  # noqa: F401  (imported before the clock starts)

    ready.put(os.getpid())
    go.wait()
    start_at = start_value.value
    rows = asyncio.run(_streams(url, streams, concurrency, prompt_len, output_len, start_at, start_at + duration))
    results.put(rows)


# ---- /health and /metrics ----------------------------------------------------------------------
class HealthPoller(threading.Thread):
    """GET /health every period: (time, HTTP status, the groups' states)."""

    def __init__(self, base: str, period: float = HEALTH_PERIOD_S):
        super().__init__(daemon=True)
        self.base, self.period = base, period
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set():
                sent = time.time()
                try:
                    r = client.get(self.base + "/health")
                    body = r.json()
                    states = [g["state"] for g in body.get("groups", [])]
                    code = r.status_code
                except Exception as exc:
                    states, code = [], f"{type(exc).__name__}"
                got = time.time()
                self.samples.append({"t": (sent + got) / 2, "latency_s": got - sent, "status": code,
                                     "states": states})
                self.stop.wait(max(0.0, self.period - (time.time() - sent)))


def _metric(base: str, name: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(base + "/metrics", timeout=60).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- the analysis (pure) ---------------------------------------------------------------------
def bucket_series(rows: list[dict], start_at: float, duration: float) -> list[int]:
    """Output tokens arriving in each whole second [i, i + 1) after start_at."""
    series = [0] * int(duration)
    for r in rows:
        for t, c in zip(r["times"], r["counts"]):
            b = math.floor(t - start_at)
            if 0 <= b < len(series):
                series[b] += c
    return series


def recovery(series: list[float], kill_at: float, warmup: int = 2, window: int = MOVING_AVERAGE_S,
             fraction: float = RECOVERED_FRACTION) -> dict:
    """Pre-kill mean (buckets [warmup, kill)), the dip (lowest bucket from the kill's on)
    and the recovery time: from the kill to the first bucket start t >= the kill's bucket
    after which every `window`-second average over [t', t' + window) stays >= fraction x
    the pre-kill mean (None when the run ends first)."""
    k = int(math.floor(kill_at))
    before = series[warmup:k]
    if not before:
        raise ValueError(f"no whole second between the warm-up ({warmup} s) and the kill ({kill_at} s)")
    mean = sum(before) / len(before)
    after = series[k:]
    dip = min(after) if after else None
    ma = [sum(series[i:i + window]) / window for i in range(len(series) - window + 1)]
    threshold = fraction * mean
    recovered_at = None
    for i in range(len(ma) - 1, k - 1, -1):  # walk back from the end while the average holds
        if ma[i] < threshold:
            break
        recovered_at = i
    return {"pre_kill_mean_tok_per_s": mean, "dip_tok_per_s": dip,
            "dip_at_s": (k + after.index(dip)) if after else None,
            "recovered_at_s": recovered_at,
            "recovery_s": None if recovered_at is None else max(0.0, recovered_at - kill_at),
            "moving_average_3s": ma}


def restart_times(samples: list[dict], t_kill: float, start_at: float, group: int = 0) -> dict:
    """From the /health samples: when the group left "serving" after the kill and when it
    served again (seconds after start_at), and the transitions seen."""
    down = up = None
    transitions, last = [], None
    for s in samples:
        state = s["states"][group] if len(s["states"]) > group else f"no answer ({s['status']})"
        if state != last:
            transitions.append({"t_s": round(s["t"] - start_at, 3), "state": state})
            last = state
        if s["t"] < t_kill:
            continue
        if down is None and state != "serving":
            down = s["t"]
        elif down is not None and up is None and state == "serving":
            up = s["t"]
    return {"group_down_at_s": None if down is None else down - start_at,
            "group_serving_at_s": None if up is None else up - start_at,
            "detect_s": None if down is None else down - t_kill,
            "restart_s": None if down is None or up is None else up - down,
            "kill_to_serving_s": None if up is None else up - t_kill,
            "health_transitions": transitions}


def request_counts(rows: list[dict]) -> dict:
    """Completed (no error, every token asked for) and failed requests; tokens by chunk
    words against the usage."""
    def tokens(r):
        return r["usage"] if r["usage"] is not None else sum(r["counts"])
    failed = [r for r in rows if r["error"] is not None or tokens(r) < r["max_tokens"]]
    mismatched = [r for r in rows if r["usage"] is not None and sum(r["counts"]) != r["usage"]]
    errors = sorted({r["error"] or f"{tokens(r)} of {r['max_tokens']} tokens" for r in failed})
    return {"requests_completed": len(rows) - len(failed), "requests_failed": len(failed), "errors": errors[:5],
            "output_tokens": sum(sum(r["counts"]) for r in rows),
            "requests_chunk_words_not_usage": len(mismatched)}


# ---- the run ------------------------------------------------------------------------------------
def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not reached in {timeout:.0f} s")
        time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a config under benchmarks/models, or a directory")
    p.add_argument("--standin", action=argparse.BooleanOptionalAction, default=None,
                   help="the stand-in model (default: on when there is no GPU; else random bf16 weights)")
    p.add_argument("--num-groups", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=30.0, help="the stand-in's decode step")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=None, help="per group (default concurrency / groups)")
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--kill-at", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=2, help="whole seconds left out of the pre-kill mean")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--num-gpus-per-worker", type=float, default=1.0)
    p.add_argument("--port", type=int, default=0, help="the ingress replicas' HTTP port (default: a free one)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.num_groups < 2:
        raise SystemExit("--num-groups must be >= 2: the killed group's requests move to another")
    if not args.warmup < args.kill_at < args.duration - MOVING_AVERAGE_S:
        raise SystemExit("need --warmup < --kill-at < --duration - 3")

    import torch
    from transformers import AutoConfig

    from benchmarks import common

    standin = (not torch.cuda.is_available()) if args.standin is None else args.standin
    max_num_seqs = args.max_num_seqs or math.ceil(args.concurrency / args.num_groups)
    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    common.add_word_tokenizer(cfg_dir, cfg)

    import ray
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": {"RAYLM_STANDIN_STEP_MS": str(args.step_ms)}} if standin else None)
    port = args.port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # Serve's proxy: unused
    engine = {"model": cfg_dir, "max_model_len": 4096, "max_num_seqs": max_num_seqs, "async_scheduling": True}
    if standin:
        engine.update(device="cpu", distributed_executor_backend=STANDIN, num_cpus_per_worker=0.1)
    else:
        engine.update(load_format="dummy", dtype="bfloat16", seed=0, num_gpus_per_worker=args.num_gpus_per_worker)
    t = time.perf_counter()
    serve.run(build_app({**engine, "num_groups": args.num_groups, "served_model_name": "bench",
                         "api_server_count": args.api_server_count, "http_port": port}),
              name=APP_NAME, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/completions"

    import httpx

    warm = httpx.post(url, timeout=120, json={"model": "bench", "prompt": [11, 12, 13], "max_tokens": 4,
                                             "ignore_eos": True})
    assert warm.status_code == 200, warm.text
    _wait(lambda: [g["state"] for g in httpx.get(base + "/health", timeout=30).json()["groups"]]
          == ["serving"] * args.num_groups, 120, "every group serving")
    print(f"app up in {time.perf_counter() - t:.0f} s", flush=True)
    router = serve.get_deployment_handle("Router", app_name=APP_NAME)
    cores = router.cores.remote().result()
    victim = ray.get(cores[0][1].ready.remote())["pid"]
    moved_before = _metric(base, "raylm:requests_redispatched_total")
    restarts_before = _metric(base, "raylm:group_restarts_total")

    # The clients: ready, then started together.
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_value = ctx.Value("d", 0.0)
    procs = []
    for i in range(args.client_procs):
        streams = list(range(i, args.concurrency, args.client_procs))
        procs.append(ctx.Process(target=_client, daemon=True, args=(
            url, streams, args.concurrency, args.prompt_len, args.output_len, args.duration, ready, go,
            start_value, results)))
        procs[-1].start()
    for _ in procs:
        ready.get(timeout=120)
    poller = HealthPoller(base)
    poller.start()
    start_at = time.time() + 0.5
    start_value.value = start_at
    go.set()

    time.sleep(max(0.0, start_at + args.kill_at - time.time()))
    os.kill(victim, signal.SIGKILL)
    t_kill = time.time()
    print(f"killed group 0's core (pid {victim}) at {t_kill - start_at:.2f} s", flush=True)

    rows = []
    for _ in procs:
        rows += results.get(timeout=args.duration + 900)
    for proc in procs:
        proc.join(timeout=30)
    wall = time.time() - start_at
    # The group may come back after the load ended: wait for it (bounded), then stop polling.
    _wait(lambda: restart_times(poller.samples, t_kill, start_at)["group_serving_at_s"] is not None, 300,
          "group 0 serving again")
    poller.stop.set()
    poller.join()
    moved = _metric(base, "raylm:requests_redispatched_total") - moved_before
    restarts = _metric(base, "raylm:group_restarts_total") - restarts_before
    new_pid = ray.get(router.cores.remote().result()[0][1].ready.remote())["pid"]

    series = bucket_series(rows, start_at, args.duration)
    rec = recovery(series, t_kill - start_at, args.warmup)
    health = restart_times(poller.samples, t_kill, start_at)
    counts = request_counts(rows)
    result = common.base_result("fault", os.path.basename(args.model.rstrip("/")))
    if standin:
        result["device"] = f"cpu ({os.cpu_count()} cores), stand-in model"
    result.update({
        "num_groups": args.num_groups, "concurrency": args.concurrency, "max_num_seqs_per_group": max_num_seqs,
        "standin": standin, "step_ms": args.step_ms if standin else None, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "duration_s": args.duration, "kill_at_s": round(t_kill - start_at, 3),
        "client_procs": args.client_procs, "api_server_count": args.api_server_count,
        "token_count": "words of each content chunk's text (the word tokenizer decodes a token to one word), "
                       "checked against usage.completion_tokens",
        "pre_kill_mean_tok_per_s": rec["pre_kill_mean_tok_per_s"], "pre_kill_from_s": args.warmup,
        "dip_tok_per_s": rec["dip_tok_per_s"], "dip_at_s": rec["dip_at_s"],
        "dip_fraction": rec["dip_tok_per_s"] / rec["pre_kill_mean_tok_per_s"],
        "recovery_s": rec["recovery_s"], "recovered_at_s": rec["recovered_at_s"],
        "recovery_definition": f"kill -> first t from which every {MOVING_AVERAGE_S} s average over [t, t + "
                               f"{MOVING_AVERAGE_S}) is >= {RECOVERED_FRACTION:.0%} of the pre-kill mean",
        "restart_s": health["restart_s"], "detect_s": health["detect_s"],
        "kill_to_serving_s": health["kill_to_serving_s"], "group_down_at_s": health["group_down_at_s"],
        "group_serving_at_s": health["group_serving_at_s"],
        **{k: v for k, v in counts.items() if k != "errors"}, "errors": counts["errors"],
        "requests_redispatched": moved, "group_restarts": restarts, "core_pid_changed": new_pid != victim,
        "health_polls": len(poller.samples),
        "health_poll_latency_max_s": max((s["latency_s"] for s in poller.samples), default=None),
        "wall_s": wall, "series": series, "moving_average_3s": [round(x, 1) for x in rec["moving_average_3s"]],
        "health_transitions": health["health_transitions"],
    })
    print(f"pre-kill {rec['pre_kill_mean_tok_per_s']:.0f} tok/s; dip {rec['dip_tok_per_s']} tok/s at "
          f"{rec['dip_at_s']} s; recovery {rec['recovery_s']} s; restart {health['restart_s']} s (detect "
          f"{health['detect_s']} s); {counts['requests_completed']} completed, {counts['requests_failed']} failed, "
          f"{moved:.0f} re-dispatched", flush=True)
    serve.shutdown()
    ray.shutdown()
    if counts["requests_failed"]:
        print(json.dumps({k: result[k] for k in ("requests_failed", "errors", "series")}), file=sys.stderr)
        raise SystemExit(f"{counts['requests_failed']} request(s) failed: {counts['errors']}")
    common.save_result(result, "fault" + (f"-{args.tag}" if args.tag else ""))


if __name__ == "__main__":
    main()
