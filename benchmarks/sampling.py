"""Temperature, top-k and top-p on one step's logits: raylm's sampler filter
(`sampler._filter`) beside HF transformers' logits warpers (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, the chain `generate` applies) on the same logits, in
one run, at the settings real generation configs ask: Qwen3's (top_k 20, top_p 0.95),
Llama-3.1-Instruct's (top_p 0.9), top_k 50 alone.

    python benchmarks/sampling.py                          # the GPU if there is one, else CPU
    python benchmarks/sampling.py --device cpu --iters 3

Per setting: ms per call for both, their ratio, the rows whose kept tokens are the same
set, and on a GPU the bandwidth floor (the logits read and the mask written once, at
the measured copy bandwidth). Beside them: raylm's filter as it was before its sort-free
kernel (`raylm_sort_ms`: a sort of the vocabulary wherever a row's k is large or absent),
and where FlashInfer is installed its sort-free kernels on the same logits: the mask
from softmax then top_k_renorm_probs / top_p_renorm_probs (`flashinfer_ms`, and its rows
with our kept tokens), and a whole draw, top_k_top_p_sampling_from_logits
(`flashinfer_sample_ms`) beside ours, the filter and the exponential race of
`sampler.sample` (`raylm_sample_ms`). Writes benchmarks/results/sampling-<device>.json
(under $OUT when set).
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

    from raylm.kernels import sampling as kernels
    from raylm.workers import sampler
    from raylm.workers.messages import SamplingOptions
    from raylm.workers.sampler import SamplingState, _filter, sample

    try:
        import flashinfer.sampling as fi
    except ImportError:
        fi = None

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
        real = sampler.top_k_top_p_filter
        sampler.top_k_top_p_filter = kernels.top_k_top_p_filter_reference  # the sort, as before
        try:
            sort_ms = timed_ms(lambda: _filter(logits, states), args.device, iters)
        finally:
            sampler.top_k_top_p_filter = real
        sample_ms = timed_ms(lambda: sample(logits, states), args.device, iters)
        # The sort-free kernel alone on every setting (the sampler takes torch.topk's
        # candidates instead where every row's k is at most TOP_K_CANDIDATES_MAX).
        scaled = logits / TEMPERATURE
        kernel_ms = timed_ms(lambda: kernels.top_k_top_p_filter(scaled, [top_k] * args.batch, [top_p] * args.batch),
                             args.device, iters)
        row = {"setting": name, "top_k": top_k, "top_p": top_p, "temperature": TEMPERATURE,
               "raylm_ms": ours_ms, "raylm_sort_ms": sort_ms, "peer_ms": peer_ms, "speedup": peer_ms / ours_ms,
               "rows_with_the_same_kept_tokens": same, "floor_ms": floor_ms,
               "fraction_of_floor": None if floor_ms is None else floor_ms / ours_ms,
               "raylm_sample_ms": sample_ms, "raylm_kernel_ms": kernel_ms}
        line = (f"{name}: raylm {ours_ms:.3f} ms (sorting: {sort_ms:.3f}), HF warpers {peer_ms:.2f} ms "
                f"({peer_ms / ours_ms:.1f}x); same kept tokens in {same} of {args.batch} rows; "
                f"raylm draw {sample_ms:.3f} ms, the kernel alone {kernel_ms:.3f} ms")
        if fi is not None and args.device == "cuda":
            def fi_mask():
                scaled = logits / TEMPERATURE
                probs = scaled.softmax(dim=1)
                if top_k > 0:
                    probs = fi.top_k_renorm_probs(probs, top_k)
                if top_p < 1.0:
                    probs = fi.top_p_renorm_probs(probs, top_p)
                return scaled.masked_fill(probs == 0, float("-inf"))

            def fi_draw():
                return fi.top_k_top_p_sampling_from_logits(logits / TEMPERATURE, top_k if top_k > 0 else
                                                           args.vocab, top_p)

            fi_same = (torch.isinf(fi_mask()) == torch.isinf(ours)).all(dim=1).sum().item()
            fi_ms = timed_ms(fi_mask, args.device, iters)
            fi_draw_ms = timed_ms(fi_draw, args.device, iters)
            row.update({"flashinfer_ms": fi_ms, "flashinfer_rows_with_our_kept_tokens": fi_same,
                        "flashinfer_sample_ms": fi_draw_ms})
            line += (f"; FlashInfer mask {fi_ms:.3f} ms (our kept tokens in {fi_same} rows), "
                     f"draw {fi_draw_ms:.3f} ms")
        rows.append(row)
        print(line, flush=True)
    result = common.base_result("sampling", "-")
    if args.device == "cpu":
        result["device"] = f"cpu ({os.cpu_count()} cores)"
    result.update({"batch_size": args.batch, "vocab_size": args.vocab, "iters": iters,
                   "peer": f"transformers {transformers.__version__}", "rows": rows,
                   "flashinfer": None if fi is None else __import__("flashinfer").__version__})
    common.save_result(result, f"sampling-{'cpu' if args.device == 'cpu' else 'gpu'}")


if __name__ == "__main__":
    main()
