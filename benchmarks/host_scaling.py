"""Host scaling without a GPU: the whole serving path (HTTP ingress replicas, router, one
engine core process per group, streaming clients in separate processes) in front of a
stand-in model that sleeps a real step's device time (`raylm.engine.standin_executor`).
What it measures is the host's share: with G groups, aggregate output tok/s should be
G times one group's, as long as the cores' loops, the ingress replicas and the clients
keep up.

    python benchmarks/host_scaling.py --groups 1,2                 # the 2-core machine
    python benchmarks/host_scaling.py --groups 1,2,4,8 --step-ms 25 --concurrency-per-group 256 \\
        --api-server-count 4 --client-procs 8                      # a 16-core machine

Each group serves --concurrency-per-group streams at once (--requests-per-group requests
of --prompt-len token ids and --output-len tokens, ignore_eos); one decode step of the
stand-in takes --step-ms plus --token-us per scheduled token. Writes
benchmarks/results/host_scaling-<tag>.json: per G the tok/s, its ratio to G x one group,
TTFT/TPOT/ITL, the cores' busy fraction, and the host CPU per output token of each role
(ingress replicas, router, cores, clients; from /proc over the load, Linux).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.loadgen import run_load, summarize  # noqa: E402

STANDIN = "raylm.engine.standin_executor:StandInExecutor"
# The serving path's processes by role, as Ray names them (their command lines).
ROLES = {"ingress": "ray::ServeReplica:raylm:Ingress", "router": "ray::ServeReplica:raylm:Router",
         "core": "ray::EngineCoreActor"}


def role_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system, every thread) used so far by each role's processes
    (Linux /proc; the clients count their own, see loadgen)."""
    out = dict.fromkeys(ROLES, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        for role, name in ROLES.items():
            if cmd.startswith(name):
                out[role] += (int(fields[11]) + int(fields[12])) / tick
    return out


def save(args, runs: list[dict]) -> None:
    """The result so far (saved after every G, so a run cut short keeps what it measured)."""
    one = runs[0]["raylm_output_tok_per_s"] / runs[0]["num_groups"]
    for run in runs:
        run["ratio_to_linear"] = run["raylm_output_tok_per_s"] / (one * run["num_groups"])
    result = common.base_result("host_scaling", args.model)
    result.update({"device": f"cpu ({os.cpu_count()} cores), stand-in model", "step_ms": args.step_ms,
                   "token_us": args.token_us, "prompt_len": args.prompt_len, "output_len": args.output_len,
                   "concurrency_per_group": args.concurrency_per_group,
                   "api_server_count": args.api_server_count, "client_procs": args.client_procs,
                   "http_stack": common.http_stack(),
                   "runs": runs, "peer": "linear scaling (G x one group)"})
    common.save_result(result, "host_scaling" + (f"-{args.tag}" if args.tag else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="config only: the stand-in loads no weights")
    p.add_argument("--groups", default="1,2")
    p.add_argument("--step-ms", type=float, default=30.0)
    p.add_argument("--token-us", type=float, default=0.0)
    p.add_argument("--concurrency-per-group", type=int, default=64)
    p.add_argument("--requests-per-group", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's logical CPUs (default: the machine's)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from transformers import AutoConfig

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    common.add_word_tokenizer(cfg_dir, cfg)

    import ray
    from ray import serve

    from raylm.cluster.app import APP_NAME, build_app

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, runtime_env={"env_vars": {
        "RAYLM_STANDIN_STEP_MS": str(args.step_ms), "RAYLM_STANDIN_TOKEN_US": str(args.token_us)}})
    # Clients reach the ingress replicas directly on --port (http_port); Serve's proxy sits
    # on the next port, unused here.
    serve.start(http_options={"host": "127.0.0.1", "port": args.port + 1})
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    runs = []
    for g in [int(x) for x in args.groups.split(",")]:
        serve.run(build_app({"model": cfg_dir, "device": "cpu", "distributed_executor_backend": STANDIN,
                             "max_model_len": 4096, "max_num_seqs": max(256, args.concurrency_per_group),
                             "async_scheduling": True,  # as on a GPU: plan while a step runs
                             "num_groups": g, "served_model_name": "bench", "num_cpus_per_worker": 0.1,
                             "api_server_count": args.api_server_count, "http_port": args.port}),
                  name=APP_NAME, route_prefix="/")
        n = args.requests_per_group * g
        bodies = [{"model": "bench", "prompt": [(7 * i + j) % 1000 + 10 for j in range(args.prompt_len)],
                   "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.6, "stream": True,
                   "stream_options": {"include_usage": True}} for i in range(n)]
        run_load(url, bodies[:4], 4, procs=1)  # warm-up
        router = serve.get_deployment_handle("Router", app_name=APP_NAME)
        before = router.stats.remote().result()
        cpu_before = role_cpu_s()
        t = time.perf_counter()
        rows, elapsed = run_load(url, bodies, args.concurrency_per_group * g, procs=args.client_procs)
        cpu_after = role_cpu_s()
        after = router.stats.remote().result()
        s = summarize(rows, elapsed)
        # Host CPU per output token by role, over the whole load (the clients' start-up excluded).
        cpu = {role: cpu_after[role] - cpu_before[role] for role in ROLES}
        cpu["clients"] = sum(r.get("client_cpu_s", 0.0) for r in rows)
        cpu_us = {role: round(1e6 * v / s["output_tokens"], 1) for role, v in cpu.items()}
        cpu_us["total"] = round(sum(cpu_us.values()), 1)
        assert s["failed"] == 0 and s["output_tokens"] == n * args.output_len, s["errors"]
        busy = [(a["busy_s"] - b["busy_s"]) / elapsed for a, b in zip(after["groups"], before["groups"])]
        run = {"num_groups": g, "num_requests": n, "max_concurrency": args.concurrency_per_group * g,
               **{k: s[k] for k in ("raylm_output_tok_per_s", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms",
                                    "time_s")},
               "core_busy_fraction": busy, "cpu_us_per_token": cpu_us, "wall_s": time.perf_counter() - t}
        runs.append(run)
        print(f"G={g}: {run['raylm_output_tok_per_s']:.0f} output tok/s, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
              f"ITL p99 {s['itl_ms']['p99']:.0f} ms, cores busy {[round(b, 2) for b in busy]}, "
              f"CPU us a token {cpu_us}", flush=True)
        save(args, runs)
        serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
