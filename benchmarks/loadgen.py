"""The load generator of the serving benchmarks: streaming `/v1/completions` requests
sent from several client processes (one Python event loop parsing 10k+ SSE chunks a
second would itself be the bottleneck), closed-loop (at most `concurrency` in flight) or
open-loop (Poisson arrivals at `rate` requests/s). Reports what `vllm bench serve`
does: output tok/s and mean/p50/p99 of TTFT, TPOT, inter-token latency and end-to-end
latency.
"""
from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import random
import statistics
import time
from typing import Optional


async def sse_chunks(resp):
    """The JSON chunks of an aiohttp streaming response (server-sent events)."""
    async for batch in sse_batches(resp):
        for chunk in batch:
            yield chunk


async def sse_batches(resp):
    """The JSON chunks of a streaming response, a list per network read: the events that
    arrived together (the clock is read once for them). Splitting the bytes on the blank
    line that ends an event costs the client a fraction of reading line by line."""
    buf = b""
    async for data in resp.content.iter_any():
        events = (buf + data).split(b"\n\n")
        buf = events.pop()
        batch = _chunks(events)
        if batch:
            yield batch
    batch = _chunks([buf.strip()])  # a last event with no blank line after it
    if batch:
        yield batch


def _chunks(events: list[bytes]) -> list[dict]:
    return [json.loads(ev[6:]) for ev in events if ev.startswith(b"data: ") and ev != b"data: [DONE]"]


async def _one(session, url: str, body: dict) -> dict:
    start = time.time()
    first, stamps, tokens, error = None, [], 0, None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return {"start": start, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
            async for batch in sse_batches(resp):
                now = time.time()
                for chunk in batch:
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = first or now
                        stamps.append(now)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("error"):
                        error = str(chunk["error"])
    except Exception as exc:  # connection reset, ...
        error = f"{type(exc).__name__}: {exc}"
    end = time.time()
    if first is None:
        return {"start": start, "end": end, "error": error or "no output"}
    return {"start": start, "end": end, "ttft": first - start, "e2e": stamps[-1] - start,
            "tpot": (stamps[-1] - first) / max(1, tokens - 1), "tokens": tokens,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "error": error}


async def _drive(url: str, bodies: list[dict], concurrency: int, rate: Optional[float],
                 start_at: float, seed: int) -> list[dict]:
    import aiohttp

    await asyncio.sleep(max(0.0, start_at - time.time()))
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def go(body):
            async with sem:
                return await _one(session, url, body)

        if rate is None:
            return await asyncio.gather(*(go(b) for b in bodies))
        rng = random.Random(seed)
        tasks = []
        for b in bodies:
            tasks.append(asyncio.ensure_future(go(b)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def _proc(args) -> list[dict]:
    cpu = time.process_time()
    rows = asyncio.run(_drive(*args))
    if rows:  # the client process's own CPU seconds, on its first row
        rows[0]["client_cpu_s"] = time.process_time() - cpu
    return rows


def run_load(url: str, bodies: list[dict], concurrency: int, procs: int = 4,
             rate: Optional[float] = None, seed: int = 0) -> tuple[list[dict], float]:
    """Send every body to `url` (streamed) from `procs` processes; (rows, wall seconds).

    The clock starts once every client process is up (a spawned process imports the
    caller's module, torch included, which takes seconds on a busy machine) and runs from
    the first request sent to the last response's end: a start time fixed before the
    processes exist counted their start-up as serving time when they came late."""
    procs = max(1, min(procs, len(bodies)))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(procs + 1)
    shares = [bodies[i::procs] for i in range(procs)]
    with ctx.Pool(procs, initializer=_client_ready, initargs=(ready,)) as pool:
        ready.wait(timeout=CLIENT_START_TIMEOUT_S)
        start_at = time.time() + 0.2
        jobs = [(url, share, max(1, math.ceil(concurrency / procs)),
                 None if rate is None else rate / procs, start_at, seed + i) for i, share in enumerate(shares)]
        rows = [r for part in pool.map(_proc, jobs, chunksize=1) for r in part]
    ends = [r.get("end", r["start"]) for r in rows]
    return rows, max(ends) - min(r["start"] for r in rows)


# How long the client processes may take to start (spawn, imports) on a loaded machine.
CLIENT_START_TIMEOUT_S = 300


def _client_ready(barrier) -> None:
    """Pool initializer: the client's imports are done; wait for the others."""
    import aiohttp  # noqa: F401

    barrier.wait(timeout=CLIENT_START_TIMEOUT_S)


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    xs = sorted(xs)
    return {"mean": 1e3 * statistics.mean(xs), "p50": 1e3 * xs[len(xs) // 2],
            "p99": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]}


def summarize(rows: list[dict], wall: float) -> dict:
    """Output tok/s and the latency distributions (ms) of the successful requests."""
    ok = [r for r in rows if r.get("error") is None and "ttft" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"completed": len(ok), "failed": len(rows) - len(ok),
            "errors": sorted({r["error"] for r in rows if r.get("error")})[:5],
            "output_tokens": tokens, "time_s": wall, "raylm_output_tok_per_s": tokens / wall,
            "requests_per_s": len(ok) / wall,
            "ttft_ms": _stats([r["ttft"] for r in ok]), "tpot_ms": _stats([r["tpot"] for r in ok]),
            "itl_ms": _stats([x for r in ok for x in r["itl"]]),
            "e2e_ms": _stats([r["e2e"] for r in ok])}
