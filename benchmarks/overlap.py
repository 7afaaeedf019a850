"""What overlapping host work with the workers' step gains in the global scheduler:
the same requests through one Ray worker group with the overlap on and off.

    python benchmarks/overlap.py [--requests 32] [--max-tokens 64]

On the CPU box this uses a tiny random Llama; pass --model DIR for another model.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(k, v)


async def run_once(model: str, overlap: bool, n: int, max_tokens: int, dummy: bool) -> dict:
    from raylm import SamplingParams
    from raylm.cluster.global_scheduler import GlobalScheduler
    from raylm.engine.config import EngineArgs

    extra = {"load_format": "dummy", "skip_tokenizer_init": True, "dtype": "bfloat16"} if dummy else {}
    sched = GlobalScheduler(EngineArgs(model=model, max_model_len=512, distributed_executor_backend="ray",
                                       gpu_memory_utilization=0.5, **extra), overlap=overlap)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=0)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(24)] for i in range(n)]
    await sched.generate(prompts[0], SamplingParams(max_tokens=4))
    steps0 = sched.groups[0].steps
    t = time.perf_counter()
    await asyncio.gather(*[sched.generate(p, sp) for p in prompts])
    elapsed = time.perf_counter() - t
    steps = sched.groups[0].steps - steps0
    await sched.shutdown()
    return {"overlap": overlap, "wall_s": elapsed, "steps": steps, "ms_per_step": 1e3 * elapsed / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dummy", action="store_true", help="random weights from the model's config.json")
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    import ray

    model = args.model
    if model is None:
        from tests.helpers import make_checkpoint
        model = make_checkpoint(os.path.join(tempfile.mkdtemp(), "llama"), "llama")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    res = {True: [], False: []}
    for _ in range(args.reps):
        for overlap in (False, True):
            r = asyncio.run(run_once(model, overlap, args.requests, args.max_tokens, args.dummy))
            res[overlap].append(r["ms_per_step"])
            print(r, flush=True)
    for overlap in (False, True):
        print(f"overlap={overlap}: median {statistics.median(res[overlap]):.2f} ms/step")
    ray.shutdown()


if __name__ == "__main__":
    main()
