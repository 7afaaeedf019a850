"""The front door under load: how fast /health answers while request bodies over the
limit are refused (413) and 256 streams run, on the whole serving path (an HTTP ingress
replica, the router, an engine core process) in front of the stand-in model that sleeps
each step's device time (`raylm.engine.standin_executor`). The issue's target: /health
p99 under 100 ms. The front door is host work, so this runs on the CPU.

    python benchmarks/front_door.py --tag cpu-2cores

--streams streaming completions (--prompt-len token ids, --output-len tokens, ignore_eos)
run at once from --client-procs processes (`loadgen.py`). Meanwhile, from a process of
its own, --bodies bodies of --body-bytes (default 17 MiB, over the default 16 MiB
max_request_body_bytes) go to /v1/completions one after another, cycling through three
ways: with Content-Length (refused from the headers), chunked as fast as the socket takes
them, and chunked slowly (64 KiB every --slow-gap-ms). Another process GETs /health every
--health-period-ms on one kept-alive connection for the whole run (every fifth probe is
/version instead, which asks nothing of the router: the ingress's event loop alone).

Figures: /health latency p50/p99/max (ms) over the probes sent while the streams ran,
while a body was being sent, and before the streams (idle); the 413 count and how many
bytes each body got in before its answer; the streams completed and failed, output tok/s;
and every response with status >= 500 (streams, probes, bodies), which should be none.
Writes benchmarks/results/front_door-<tag>.json.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STANDIN = "raylm.engine.standin_executor:StandInExecutor"
MODES = ("content-length", "chunked-fast", "chunked-slow")
CHUNK = 64 << 10
LIMIT = 16 << 20  # the default max_request_body_bytes


# ---- the /health prober and the body sender (their own processes) -------------------------------
def probe_health(base: str, period: float, stop, results) -> None:
    """GET /health every `period` seconds until `stop`, and /version after every fourth
    (it asks nothing of the router: the ingress's own event loop alone); each probe's
    (path, sent time, latency s, status)."""
    import httpx

    samples = []
    with httpx.Client(timeout=30.0) as client:
        while not stop.is_set():
            sent = time.time()
            path = "/version" if len(samples) % 5 == 4 else "/health"
            try:
                status = client.get(base + path).status_code
            except Exception as exc:  # a timeout or a reset counts as a failed probe
                status = type(exc).__name__
            got = time.time()
            samples.append({"path": path, "t": sent, "latency_s": got - sent, "status": status})
            stop.wait(max(0.0, period - (got - sent)))
    results.put(samples)


def _answer_now(sock: socket.socket) -> bytes:
    """What the server has sent so far, without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return b""
    try:
        return sock.recv(65536) or b""
    except ConnectionResetError:
        return b""


def _status_of(sock: socket.socket, data: bytes) -> int | str:
    """The status of the server's answer (reading until its status line is in)."""
    sock.settimeout(30)
    while b"\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout) as exc:
            return type(exc).__name__
        if not chunk:
            return "closed without an answer"
        data += chunk
    try:
        return int(data.split(b"\r\n", 1)[0].split()[1])
    except (ValueError, IndexError):
        return f"unreadable answer {data[:40]!r}"


def send_big_body(host: str, port: int, size: int, mode: str, slow_gap: float) -> dict:
    """One body of `size` bytes to /v1/completions, sent until the server answers."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    head += ((b"Content-Length: %d\r\n\r\n" % size) if mode == "content-length"
             else b"Transfer-Encoding: chunked\r\n\r\n")
    body = b'{"prompt": "' + b"x" * CHUNK
    start, sent, answer, error = time.time(), 0, b"", None
    with socket.create_connection((host, port), timeout=30) as sock:
        try:
            sock.sendall(head)
            while sent < size and not (answer := _answer_now(sock)):
                piece = body[:min(CHUNK, size - sent)]
                sock.sendall(piece if mode == "content-length" else b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                if mode == "chunked-slow":
                    time.sleep(slow_gap)
        except (BrokenPipeError, ConnectionResetError) as exc:  # refused: the server closed
            error = type(exc).__name__
        status = _status_of(sock, answer)
    return {"mode": mode, "start": start, "end": time.time(), "sent_bytes": sent, "status": status,
            "send_error": error}


def send_bodies(host: str, port: int, count: int, size: int, start_at: float, gap: float, slow_gap: float,
                results) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    for i in range(count):
        out.append(send_big_body(host, port, size, MODES[i % len(MODES)], slow_gap))
        time.sleep(gap)
    results.put(out)


# ---- the analysis (pure) -----------------------------------------------------------------------
def latency_ms(samples: list[dict], windows: list[tuple[float, float]], path: str = "/health") -> dict:
    """p50/p99/max (ms) and count of the probes of `path` sent inside any of `windows`."""
    xs = sorted(1e3 * s["latency_s"] for s in samples
                if s.get("path", "/health") == path and any(a <= s["t"] <= b for a, b in windows))
    if not xs:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": len(xs), "p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "max": xs[-1]}


def server_errors(stream_rows: list[dict], samples: list[dict], bodies: list[dict]) -> int:
    """Responses with status >= 500: stream requests (an HTTP 5xx, or a 5xx error event
    in the stream), /health probes and body answers."""
    def is_5xx(status) -> bool:
        return isinstance(status, int) and status >= 500

    streams = sum(1 for r in stream_rows if (r.get("error") or "").startswith("HTTP 5")
                  or "'code': 5" in (r.get("error") or ""))
    return streams + sum(is_5xx(s["status"]) for s in samples) + sum(is_5xx(b["status"]) for b in bodies)


def analyse(stream_rows: list[dict], samples: list[dict], bodies: list[dict], stream_summary: dict) -> dict:
    """The figures of a run (see the module doc)."""
    t0 = min(r["start"] for r in stream_rows)
    t1 = max(r.get("end", r["start"]) for r in stream_rows)
    body_windows = [(b["start"], b["end"]) for b in bodies]
    return {
        "health_ms_during_streams": latency_ms(samples, [(t0, t1)]),
        "health_ms_while_bodies_sent": latency_ms(samples, body_windows),
        "health_ms_idle_before": latency_ms(samples, [(float("-inf"), t0)]),
        "version_ms_during_streams": latency_ms(samples, [(t0, t1)], "/version"),
        "health_failed_probes": sum(1 for s in samples if s["status"] != 200),
        "bodies": len(bodies), "bodies_413": sum(1 for b in bodies if b["status"] == 413),
        "bodies_during_streams": sum(1 for b in bodies if t0 <= b["start"] and b["end"] <= t1),
        "body_answers": [{"mode": b["mode"], "status": b["status"],
                          "sent_mib": round(b["sent_bytes"] / 2**20, 2),
                          "answer_ms": round(1e3 * (b["end"] - b["start"]), 1)} for b in bodies],
        "streams_completed": stream_summary["completed"], "streams_failed": stream_summary["failed"],
        "stream_errors": stream_summary["errors"],
        "output_tok_per_s": stream_summary["raylm_output_tok_per_s"],
        "responses_5xx": server_errors(stream_rows, samples, bodies),
        "streams_wall_s": t1 - t0,
    }


# ---- the run -----------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="config only: the stand-in loads no weights")
    p.add_argument("--step-ms", type=float, default=30.0)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=300)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--bodies", type=int, default=6)
    p.add_argument("--body-bytes", type=int, default=17 << 20)
    p.add_argument("--bodies-after-s", type=float, default=5.0, help="after the streams are sent")
    p.add_argument("--body-gap-s", type=float, default=0.5)
    p.add_argument("--slow-gap-ms", type=float, default=10.0, help="between 64 KiB chunks of a slow body")
    p.add_argument("--health-period-ms", type=float, default=20.0)
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from transformers import AutoConfig

    from benchmarks import common
    from benchmarks.loadgen import run_load, summarize
    from tests.helpers import free_port

    load_at_start = round(os.getloadavg()[0], 2)
    cfg_dir = common.model_dir(args.model)
    common.add_word_tokenizer(cfg_dir, AutoConfig.from_pretrained(cfg_dir))

    import ray
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    ray.init(include_dashboard=False, runtime_env={"env_vars": {"RAYLM_STANDIN_STEP_MS": str(args.step_ms)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # Serve's proxy: unused
    serve.run(build_app({"model": cfg_dir, "device": "cpu", "distributed_executor_backend": STANDIN,
                         "max_model_len": 4096, "max_num_seqs": max(256, args.streams),
                         "async_scheduling": True,
                         "served_model_name": "bench", "num_cpus_per_worker": 0.1, "http_port": port}),
              name=APP_NAME, route_prefix="/")
    base, url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1/completions"
    bodies = [{"model": "bench", "prompt": [(7 * i + j) % 1000 + 10 for j in range(args.prompt_len)],
               "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.6, "stream": True,
               "stream_options": {"include_usage": True}} for i in range(args.streams)]
    run_load(url, bodies[:4], 4, procs=1)  # warm-up

    ctx = multiprocessing.get_context("spawn")
    stop, health_q, body_q = ctx.Event(), ctx.Queue(), ctx.Queue()
    prober = ctx.Process(target=probe_health, args=(base, args.health_period_ms / 1e3, stop, health_q))
    sender = ctx.Process(target=send_bodies, args=("127.0.0.1", port, args.bodies, args.body_bytes,
                                                   time.time() + args.bodies_after_s, args.body_gap_s,
                                                   args.slow_gap_ms / 1e3, body_q))
    prober.start()
    sender.start()
    time.sleep(1.0)  # idle probes first
    rows, elapsed = run_load(url, bodies, args.streams, procs=args.client_procs)
    big = body_q.get(timeout=600)
    stop.set()
    samples = health_q.get(timeout=60)
    prober.join(30)
    sender.join(30)
    serve.shutdown()
    ray.shutdown()

    summary = summarize(rows, elapsed)
    figures = analyse(rows, samples, big, summary)
    result = common.base_result("front_door", os.path.basename(args.model.rstrip("/")))
    result.update({"device": f"cpu ({os.cpu_count()} cores)", "standin": True, "step_ms": args.step_ms,
                   "load_average_1m_at_start": load_at_start,  # other work on the machine shows here
                   "streams": args.streams, "prompt_len": args.prompt_len, "output_len": args.output_len,
                   "client_procs": args.client_procs, "body_bytes": args.body_bytes, "http_stack": common.http_stack(),
                   "max_request_body_bytes": LIMIT, "slow_gap_ms": args.slow_gap_ms,
                   "health_period_ms": args.health_period_ms, "health_target_p99_ms": 100.0, **figures,
                   "ttft_ms": summary["ttft_ms"], "tpot_ms": summary["tpot_ms"], "itl_ms": summary["itl_ms"]})
    h = figures["health_ms_during_streams"]
    print(f"/health during {args.streams} streams: p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms, max "
          f"{h['max']:.1f} ms ({h['count']} probes); {figures['bodies_413']}/{figures['bodies']} bodies 413; "
          f"streams {figures['streams_completed']} completed, {figures['streams_failed']} failed; "
          f"{figures['responses_5xx']} responses >= 500", flush=True)
    common.save_result(result, "front_door" + (f"-{args.tag}" if args.tag else ""))


if __name__ == "__main__":
    main()
