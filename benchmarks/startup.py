"""Where the serving path's start-up goes: from this process's start to the first served
request, on one timeline, the driver's steps (imports, `ray.init`, `serve.start`,
`serve.run`, the first request) beside the marks each actor of the application keeps
(raylm.cluster.startup): the router replica, each engine core process (its imports, the
engine's load / memory profile / KV cache and graphs phases) and the ingress replicas.

    python benchmarks/startup.py --model qwen3-0.6b                       # on the GPU
    python benchmarks/startup.py --model DIR --engine-arg max_num_batched_tokens=512  # CPU

Random weights (`load_format="dummy"`). The benchmark's own preparation (the model folder's
stand-in tokenizer, written with transformers) runs first, in this process; then a fresh
process is measured, which imports before serving only what `raylm serve` imports (Ray and
raylm.cluster: no torch, no transformers; torch and the benchmark's helpers come after the
first request). Prints the timeline, and the critical path: the stretch of each phase that
nothing else overlapped. Writes benchmarks/results/startup-<model>[-<tag>].json (or under
$OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raylm.cluster.startup import StartupMarks  # noqa: E402  (light: no torch, no ray)

DRIVER = StartupMarks("driver")
LOAD_AT_START = os.getloadavg()[0]


def timeline(parts: list[dict], t0: float) -> list[dict]:
    """Every mark of every process as {who, mark, t_s (since t0)}, in time order."""
    rows = [{"who": p["role"] if p["role"] in ("driver", "router") else f"{p['role']} (pid {p['pid']})",
             "mark": name, "t_s": round(t - t0, 3)}
            for p in parts for name, t in p["marks"].items()]
    return sorted(rows, key=lambda r: r["t_s"])


def phases(parts: list[dict]) -> list[dict]:
    """Consecutive marks of each process as named spans {who, phase, start_s, s}."""
    out = []
    for p in parts:
        items = sorted(p["marks"].items(), key=lambda kv: kv[1])
        for (a, ta), (b, tb) in zip(items, items[1:]):
            out.append({"who": p["role"], "phase": f"{a} -> {b}", "start": ta, "s": round(tb - ta, 3)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a folder name under ../shared/models or a path")
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--api-server-count", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tag", default="")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra engine argument (repeatable), e.g. max_num_batched_tokens=512")
    p.add_argument("--prepared", default=None, help=argparse.SUPPRESS)  # the measured process's model folder
    args = p.parse_args()

    if args.prepared is None:  # the benchmark's preparation, then the measured process
        from transformers import AutoConfig

        from benchmarks import common

        cfg_dir = common.model_dir(args.model)
        common.add_word_tokenizer(cfg_dir, AutoConfig.from_pretrained(cfg_dir))
        sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--prepared", cfg_dir]))
    cfg_dir = args.prepared
    import ray
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    DRIVER.mark("raylm_imports")
    ray.init(include_dashboard=False)  # as `raylm serve` starts Ray
    DRIVER.mark("ray_init")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port + 1})
    DRIVER.mark("serve_start")
    extra = {}
    for kv in args.engine_arg:
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except ValueError:
            extra[k] = v
    serve.run(build_app({"model": cfg_dir, "load_format": "dummy", "max_model_len": args.max_model_len,
                         "seed": 0, "num_groups": args.num_groups, "served_model_name": "bench",
                         "api_server_count": args.api_server_count, "http_port": args.port, **extra}),
              name=APP_NAME, route_prefix="/")
    DRIVER.mark("serve_run")
    body = {"model": "bench", "prompt": [11, 12, 13, 14], "max_tokens": 4, "ignore_eos": True}
    req = urllib.request.Request(f"http://127.0.0.1:{args.port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())
    assert answer["usage"]["completion_tokens"] == 4, answer
    DRIVER.mark("first_request")
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)  # none, as in `raylm serve`

    router = serve.get_deployment_handle("Router", app_name=APP_NAME)
    ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    parts = [DRIVER.to_dict()] + router.startup_marks.remote().result()
    seen = set()
    for _ in range(8 * args.api_server_count):  # calls spread over the replicas
        m = ingress.startup_marks.remote().result()
        if m["pid"] not in seen:
            seen.add(m["pid"])
            parts.append(m)
        if len(seen) == args.api_server_count:
            break
    t0 = DRIVER.marks["process_start"]
    line = timeline(parts, t0)
    for r in line:
        print(f"{r['t_s']:8.2f} s  {r['who']:<22} {r['mark']}")
    spans = sorted(phases(parts), key=lambda s: -s["s"])
    print("\nlongest spans:")
    for s in spans[:10]:
        print(f"{s['s']:8.2f} s  {s['who']:<10} {s['phase']}")
    core_phases = [p.get("phases") for p in parts if p["role"].startswith("core")]
    for ph in core_phases:
        print("engine core phases (s):", ", ".join(f"{k} {v:.2f}" for k, v in (ph or {}).items()))
    total = DRIVER.marks["first_request"] - t0
    print(f"\nprocess start to first served request: {total:.1f} s")

    from benchmarks import common  # torch: after the first request, as `raylm serve` never imports it

    result = common.base_result("startup", args.model)
    result["command"] = result["command"].split(" --prepared ")[0]
    if result["device"] == "cpu":
        result["device"] = f"cpu ({os.cpu_count()} cores)"
    result.update({"num_groups": args.num_groups, "api_server_count": args.api_server_count,
                   "max_model_len": args.max_model_len, "engine_args": extra,
                   "startup_s": round(total, 2), "timeline": line,
                   "longest_spans": [{k: v for k, v in s.items() if k != "start"} for s in spans[:10]],
                   "core_phases_s": core_phases, "cpu_count": os.cpu_count(),
                   "load_average_at_start": round(LOAD_AT_START, 2),
                   "driver_imported_before_first_request": heavy})
    common.save_result(result, f"startup-{os.path.basename(args.model.rstrip('/'))}"
                       + (f"-{args.tag}" if args.tag else ""))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
