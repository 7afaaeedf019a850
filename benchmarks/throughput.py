"""Offline throughput: nano-vllm's workload (256 requests, prompt and output lengths
uniform in 100-1024, random token ids, ignore_eos) on random bf16 weights, raylm and HF
transformers on the same weights in the same run, against the roofline.

    python benchmarks/throughput.py --model qwen3-0.6b
    python benchmarks/throughput.py --model llama-3.1-8b --hf-batch-size 64

Writes benchmarks/results/throughput-<model>.json (or under $OUT); `benchmarks/record.py`
turns result files into RESULTS.md rows and a plot.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a name under ../shared/models or a dir with config.json")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--peer", choices=["hf", "none"], default="hf")
    p.add_argument("--hf-batch-size", type=int, default=128)
    args = p.parse_args()

    from transformers import AutoConfig

    from raylm import LLM, SamplingParams

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    prompts, outputs = common.make_workload(args.num_requests, args.min_len, args.max_len, cfg.vocab_size)
    bandwidth, peak = common.measure_bandwidth(), common.measure_matmul_peak()
    print(f"measured: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)

    hf = common.hf_model_on_gpu(cfg) if args.peer == "hf" else None
    t = time.perf_counter()
    llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
              attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)
    startup_s = time.perf_counter() - t
    if hf is not None:
        common.copy_weights_into_raylm(llm, hf)
    engine = llm.llm_engine

    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    engine.reset_timing()
    sps = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=o) for o in outputs]
    torch.cuda.synchronize()
    t = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": x} for x in prompts], sps, use_tqdm=False)
    elapsed = time.perf_counter() - t
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    assert generated == sum(outputs), (generated, sum(outputs))
    timing = engine.timing_summary()
    stats = llm.stats()
    llm.shutdown()
    del llm, engine, results
    gc.collect()
    torch.cuda.empty_cache()

    result = common.base_result("throughput", args.model)
    result.update({
        "num_requests": args.num_requests, "output_tokens": generated,
        "prompt_tokens": sum(len(x) for x in prompts), "temperature": args.temperature,
        "raylm_time_s": elapsed, "raylm_output_tok_per_s": generated / elapsed,
        "raylm_startup_s": startup_s, "raylm_steps": stats["num_steps"],
        "raylm_preemptions": stats["num_preemptions"], "raylm_kv_blocks": stats["num_blocks"],
        "raylm_timing": timing,
        "measured_bandwidth_Bps": bandwidth, "measured_bf16_flops": peak,
        "enforce_eager": args.enforce_eager, "attention_backend": args.attention_backend,
    })
    result.update(common.throughput_roofline(prompts, outputs, common.model_numbers(cfg), bandwidth, peak))
    result["fraction_of_roofline"] = result["raylm_output_tok_per_s"] / result["roofline_output_tok_per_s"]
    print(f"raylm: {result['raylm_output_tok_per_s']:.0f} output tok/s "
          f"({result['fraction_of_roofline']:.2f} of the roofline "
          f"{result['roofline_output_tok_per_s']:.0f})", flush=True)
    if hf is not None:
        result["peer"] = f"transformers {__import__('transformers').__version__} generate (sdpa, bf16, batch {args.hf_batch_size})"
        result.update(common.hf_generate_throughput(hf, prompts, outputs, args.hf_batch_size, args.temperature))
        result["ratio_vs_peer"] = result["raylm_output_tok_per_s"] / result["peer_output_tok_per_s"]
        print(f"HF: {result['peer_output_tok_per_s']:.0f} output tok/s; raylm/HF = {result['ratio_vs_peer']:.1f}x")
    else:
        result["peer"], result["peer_output_tok_per_s"] = None, None
    common.save_result(result, f"throughput-{args.model}")


if __name__ == "__main__":
    main()
