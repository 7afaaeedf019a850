"""Where the GPU time of a serving step goes: the offline engine driven as the serving
benchmark's closed loop (512 requests of 100-1024 prompt and output tokens, 256 in
flight, each finished request replaced at once), with `torch.profiler` over a window of
steps in the steady state. Kernels are summed by family (GEMMs, prefill and decode
attention, KV-cache writes, norms, rotary, activation, sampling, the rest), per step,
beside the host's wall time per step.

    python benchmarks/gpu_step_breakdown.py --model llama-3.1-8b
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

# Kernel name fragments (lower case) -> family; the first match wins.
FAMILIES = (
    ("prefill_attention", "attention (prefill / mixed)"), ("prefill_attn", "attention (prefill / mixed)"),
    ("decode_attention", "attention (decode)"), ("decode_attn", "attention (decode)"),
    ("_decode_split", "attention (decode)"), ("_decode_reduce", "attention (decode)"),
    ("flash", "attention (library)"), ("batchprefill", "attention (library)"),
    ("batchdecode", "attention (library)"),
    ("rotary_write_kv", "rotary + kv-cache write"), ("gemv_silu", "gemm + activation"), ("gemv", "gemm"),
    ("kv_cache", "kv-cache write"), ("write_kv", "kv-cache write"),
    ("rms_norm", "norm"), ("rotary", "rotary"), ("silu", "activation"),
    ("gemm", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"), ("xmma", "gemm"), ("cublas", "gemm"),
    ("sort", "sampling"), ("exponential", "sampling"), ("argmax", "sampling"), ("softmax", "sampling"),
    ("topk", "sampling"), ("nccl", "all-reduce"), ("memcpy", "copies"), ("memset", "copies"),
)


def family(name: str) -> str:
    low = name.lower()
    for frag, fam in FAMILIES:
        if frag in low:
            return fam
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--profile-steps", type=int, default=40)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--top", type=int, default=15, help="how many kernels to list by time")
    p.add_argument("--tag", default="", help="suffix for the result file's name")
    args = p.parse_args()

    from raylm import LLM, SamplingParams

    cfg_dir = common.model_dir(args.model)
    extra = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16" if torch.cuda.is_available() else "float32",
              max_model_len=4096, max_num_seqs=args.concurrency, gpu_memory_utilization=0.85, **extra)
    engine = llm.llm_engine
    prompts, outputs = common.make_workload(args.num_requests, args.min_len, args.max_len, engine.vocab_size)
    pending = list(zip(prompts, outputs))
    in_flight = 0

    def top_up():
        nonlocal in_flight
        while pending and in_flight < args.concurrency:
            prompt, n = pending.pop(0)
            engine.add_request(engine.next_request_id(), {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=n, temperature=0.6, ignore_eos=True))
            in_flight += 1

    def step() -> None:
        nonlocal in_flight
        in_flight -= sum(1 for o in engine.step() if o.finished)
        top_up()

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    top_up()
    for _ in range(args.warmup_steps):
        step()
    sync()
    stats0 = engine.stats()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            step()
        sync()
    wall = time.perf_counter() - t0
    stats1 = engine.stats()
    by_family: dict[str, float] = collections.Counter()
    by_kernel: dict[str, float] = collections.Counter()
    kernel_calls: dict[str, int] = collections.Counter()
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0)
        if not us or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        by_family[family(ev.key)] += us
        by_kernel[ev.key[:90]] += us
        kernel_calls[ev.key[:90]] += ev.count
    n = args.profile_steps
    gpu_ms = sum(by_family.values()) / 1e3 / n
    tokens = (stats1.get("generation_tokens", 0) - stats0.get("generation_tokens", 0))
    top = by_kernel.most_common(args.top)
    rec = common.base_result("gpu_step_breakdown", os.path.basename(args.model.rstrip("/")))
    rec.update({
        "command": "python " + " ".join(sys.argv),
        "concurrency": args.concurrency, "warmup_steps": args.warmup_steps, "profile_steps": n,
        "attention_backend": args.attention_backend or "default",
        "wall_ms_per_step": 1e3 * wall / n, "gpu_kernel_ms_per_step": gpu_ms,
        "output_tokens_per_step": tokens / n if tokens else None,
        "mixed_steps": stats1.get("num_mixed_steps", 0) - stats0.get("num_mixed_steps", 0),
        "families_ms_per_step": {k: v / 1e3 / n for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": {k: v / 1e3 / n for k, v in top},
        # Launches per step of those kernels, and of all kernels: at small batches the
        # step's fixed cost is largely these launches' count times their minimum duration.
        "top_kernels_calls_per_step": {k: kernel_calls[k] / n for k, _ in top},
        "kernel_calls_per_step": sum(kernel_calls.values()) / n,
    })
    print(f"wall {rec['wall_ms_per_step']:.2f} ms/step, GPU kernels {gpu_ms:.2f} ms/step, "
          f"{rec['output_tokens_per_step']} output tokens/step, {rec['mixed_steps']} mixed of {n}")
    for k, v in rec["families_ms_per_step"].items():
        print(f"  {k:30s} {v:7.3f} ms/step")
    print(f"{rec['kernel_calls_per_step']:.0f} kernel launches per step; top kernels:")
    for k, v in rec["top_kernels_ms_per_step"].items():
        print(f"  {v * 1e3:8.1f} us/step  {rec['top_kernels_calls_per_step'][k]:5.0f}x  {k}")
    common.save_result(rec, f"gpu_step_breakdown-{rec['model']}"
                       + (f"-{args.attention_backend}" if args.attention_backend else "")
                       + (f"-{args.tag}" if args.tag else ""))
    llm.shutdown()


if __name__ == "__main__":
    main()
