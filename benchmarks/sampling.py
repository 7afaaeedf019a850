"""Temperature, top-k and top-p on one step's logits: raylm's sampler filter
(`sampler._filter`) beside HF transformers' logits warpers (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, the chain `generate` applies) on the same logits, in
one run, at the settings real generation configs ask: Qwen3's (top_k 20, top_p 0.95),
Llama-3.1-Instruct's (top_p 0.9), top_k 50 alone.

    python benchmarks/sampling.py                          # the GPU if there is one, else CPU
    python benchmarks/sampling.py --device cpu --iters 3

Per setting: ms per call for both, their ratio, the rows whose kept tokens are the same
set, and on a GPU the bandwidth floor (the logits read and the mask written once, at
the measured copy bandwidth). Writes benchmarks/results/sampling-<device>.json (under
$OUT when set).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

SETTINGS = [("Qwen3 generation config", 20, 0.95), ("Llama-3.1-Instruct generation config", 0, 0.9),
            ("top_k 50", 50, 1.0)]
TEMPERATURE = 0.6


def timed_ms(fn, device: str, iters: int) -> float:
    if device == "cuda":
        return common.cuda_time_us(fn, iters) / 1e3
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936, help="Qwen3's vocabulary; Llama 3's is 128256")
    p.add_argument("--iters", type=int, default=None, help="default 50 on a GPU, 3 on the CPU")
    args = p.parse_args()
    iters = args.iters or (50 if args.device == "cuda" else 3)

    import transformers
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from raylm.workers.messages import SamplingOptions
    from raylm.workers.sampler import SamplingState, _filter

    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, device=args.device) * 3
    ids = torch.zeros(args.batch, 1, dtype=torch.long, device=args.device)
    floor_ms = None
    if args.device == "cuda":
        floor_ms = 1e3 * (logits.numel() * 4 * 2) / common.measure_bandwidth()
    rows = []
    for name, top_k, top_p in SETTINGS:
        options = SamplingOptions(temperature=TEMPERATURE, top_k=top_k, top_p=top_p)
        states = [SamplingState([], options, []) for _ in range(args.batch)]
        warpers = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE)]
                                      + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                                      + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
        ours, theirs = _filter(logits, states), warpers(ids, logits.clone())
        same = (torch.isinf(ours) == torch.isinf(theirs)).all(dim=1).sum().item()
        ours_ms = timed_ms(lambda: _filter(logits, states), args.device, iters)
        peer_ms = timed_ms(lambda: warpers(ids, logits.clone()), args.device, iters)
        rows.append({"setting": name, "top_k": top_k, "top_p": top_p, "temperature": TEMPERATURE,
                     "raylm_ms": ours_ms, "peer_ms": peer_ms, "speedup": peer_ms / ours_ms,
                     "rows_with_the_same_kept_tokens": same, "floor_ms": floor_ms,
                     "fraction_of_floor": None if floor_ms is None else floor_ms / ours_ms})
        print(f"{name}: raylm {ours_ms:.2f} ms, HF warpers {peer_ms:.2f} ms ({peer_ms / ours_ms:.1f}x); "
              f"same kept tokens in {same} of {args.batch} rows", flush=True)
    result = common.base_result("sampling", "-")
    if args.device == "cpu":
        result["device"] = f"cpu ({os.cpu_count()} cores)"
    result.update({"batch_size": args.batch, "vocab_size": args.vocab, "iters": iters,
                   "peer": f"transformers {transformers.__version__}", "rows": rows})
    common.save_result(result, f"sampling-{'cpu' if args.device == 'cpu' else 'gpu'}")


if __name__ == "__main__":
    main()
