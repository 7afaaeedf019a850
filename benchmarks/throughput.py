"""Offline throughput: nano-vllm's workload (256 requests, prompt and output lengths
uniform in 100-1024, random token ids, ignore_eos) on random bf16 weights, raylm and HF
transformers on the same weights in the same run, against the roofline.

    python benchmarks/throughput.py --model qwen3-0.6b
    python benchmarks/throughput.py --model llama-3.1-8b --hf-batch-size 64
    python benchmarks/throughput.py --model llama-3.1-8b --tensor-parallel-size 2 --peer none
    python benchmarks/throughput.py --model llama-3.1-8b --num-groups 2 --peer none

With --tensor-parallel-size N > 1 the ranks are Ray actors, one GPU each, over NCCL; with
--num-groups G > 1 the requests go through the global scheduler (raylm.cluster) to G Ray
worker groups of N GPUs each. The roofline then counts G * N GPUs' measured bandwidth and
peak (ideal scaling), and the all-reduce time per forward pass is measured on the ranks.

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
    common.add_workload_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                   help="engine argument async_scheduling (auto: on for TP=1 on a GPU)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--peer", choices=["hf", "none"], default="hf")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="every request's top_p (Llama-3.1-Instruct's generation config asks 0.9)")
    p.add_argument("--hf-batch-size", type=int, default=128)
    args = p.parse_args()

    from transformers import AutoConfig

    from raylm import SamplingParams

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    prompts, outputs = common.make_workload(args.num_requests, args.min_len, args.max_len, cfg.vocab_size)
    bandwidth, peak = common.measure_bandwidth(), common.measure_matmul_peak()
    print(f"measured: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    torch.cuda.empty_cache()  # give the measurement's buffers back before the engine sizes its KV pool

    tp, groups = args.tensor_parallel_size, args.num_groups
    if (tp > 1 or groups > 1) and args.peer == "hf":
        raise SystemExit("--peer hf needs the weights in this process: use --peer none with "
                         "--tensor-parallel-size/--num-groups above 1 (compare with a TP=1 run)")
    engine_kwargs = dict(model=cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                         max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
                         attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                         tensor_parallel_size=tp,
                         async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling])
    if args.top_p < 1.0 and args.peer == "hf":
        raise SystemExit("--top-p below 1 is raylm's alone: use --peer none")
    sps = [SamplingParams(temperature=args.temperature, top_p=args.top_p, ignore_eos=True, max_tokens=o)
           for o in outputs]
    if groups > 1:
        run = run_groups(engine_kwargs, groups, prompts, sps)
    else:
        run = run_llm(engine_kwargs, prompts, sps, cfg if args.peer == "hf" else None)
    generated = run["output_tokens"]
    assert generated == sum(outputs), (generated, sum(outputs))
    hf = run.pop("hf")
    elapsed = run["raylm_time_s"]
    gc.collect()
    torch.cuda.empty_cache()

    result = common.base_result("throughput", args.model)
    result.update({
        "num_requests": args.num_requests, "prompt_tokens": sum(len(x) for x in prompts),
        "temperature": args.temperature, "top_p": args.top_p, "raylm_output_tok_per_s": generated / elapsed,
        "tensor_parallel_size": tp, "num_groups": groups, "num_gpus": tp * groups,
        "measured_bandwidth_Bps": bandwidth, "measured_bf16_flops": peak,
        "enforce_eager": args.enforce_eager, "attention_backend": args.attention_backend,
        "async_scheduling": args.async_scheduling,
    })
    result.update(run)
    gpus = tp * groups  # ideal scaling: every GPU's bandwidth and peak
    result.update(common.throughput_roofline(prompts, outputs, common.model_numbers(cfg),
                                             gpus * bandwidth, gpus * peak))
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
    suffix = (f"-tp{tp}" if tp > 1 else "") + ("-sync" if args.async_scheduling == "off" else "") + (f"-{groups}groups" if groups > 1 else "") + (f"-{args.tag}" if args.tag else "")
    common.save_result(result, f"throughput-{args.model}{suffix}")


def run_llm(engine_kwargs: dict, prompts, sps, hf_cfg) -> dict:
    """The workload through `LLM.generate` (in-process at TP=1, Ray actors above)."""
    from raylm import LLM, SamplingParams

    hf = common.hf_model_on_gpu(hf_cfg) if hf_cfg is not None else None
    t = time.perf_counter()
    llm = LLM(**engine_kwargs)
    startup_s = time.perf_counter() - t
    if hf is not None:
        common.copy_weights_into_raylm(llm, hf)
    engine = llm.llm_engine
    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=1, ignore_eos=True),
                 use_tqdm=False)  # the first token served
    first_token_s = common.process_age_s()
    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    engine.reset_timing()
    torch.cuda.synchronize()
    t = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": x} for x in prompts], sps, use_tqdm=False)
    elapsed = time.perf_counter() - t
    timing = engine.timing_summary()
    stats = llm.stats()
    run = {"raylm_time_s": elapsed, "raylm_startup_s": startup_s,
           "raylm_startup_timing": engine.startup_timing,
           # Process start (imports, the benchmark's bandwidth and matmul measurements, the
           # HF peer when it runs) to the first generated token.
           "process_start_to_first_token_s": first_token_s,
           "output_tokens": sum(len(r.outputs[0].token_ids) for r in results),
           "raylm_steps": stats["num_steps"], "raylm_preemptions": stats["num_preemptions"],
           "raylm_kv_blocks": stats["num_blocks"], "raylm_timing": timing, "hf": hf}
    if engine_kwargs["tensor_parallel_size"] > 1:
        run.update(all_reduce_profile(engine.executor, elapsed / max(1, timing["steps"])))
    llm.shutdown()
    return run


def all_reduce_profile(executor, step_s: float) -> dict:
    """All-reduce time per forward pass on rank 0 at a decode batch of 1 and 256 sequences
    and at a 2048-token prefill chunk, and its share of the run's mean step time at 256."""
    per_pass = {n: executor.profile_all_reduce(n) for n in (1, 256, 2048)}
    for n, s_ in per_pass.items():
        print(f"all-reduce per forward pass at {n} tokens: {1e3 * s_:.3f} ms", flush=True)
    return {"all_reduce_ms_per_pass": {str(n): 1e3 * s_ for n, s_ in per_pass.items()},
            "all_reduce_share_of_step_at_256": per_pass[256] / step_s}


def run_groups(engine_kwargs: dict, num_groups: int, prompts, sps) -> dict:
    """The workload through the in-process cluster (router and frontend) over
    `num_groups` worker groups whose ranks are Ray actors, all requests submitted at once."""
    import asyncio

    from raylm.cluster.local import LocalCluster
    from raylm.engine.config import EngineArgs

    async def go() -> dict:
        t = time.perf_counter()
        gs = LocalCluster(EngineArgs(**engine_kwargs, distributed_executor_backend="ray"), num_groups)
        startup_s = time.perf_counter() - t
        from raylm import SamplingParams

        await gs.generate({"prompt_token_ids": prompts[0][:64]}, SamplingParams(max_tokens=8, ignore_eos=True))
        before = gs.stats()["groups"]
        t = time.perf_counter()
        outs = await asyncio.gather(*(gs.generate({"prompt_token_ids": p}, sp) for p, sp in zip(prompts, sps)))
        elapsed = time.perf_counter() - t
        after = gs.stats()["groups"]
        per_group = [{"steps": a["steps"] - b["steps"], "busy_fraction": (a["busy_s"] - b["busy_s"]) / elapsed,
                      "num_blocks": a["num_blocks"]} for a, b in zip(after, before)]
        await gs.shutdown()
        return {"raylm_time_s": elapsed, "raylm_startup_s": startup_s,
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "raylm_steps": sum(g["steps"] for g in per_group), "groups": per_group, "hf": None}

    return asyncio.run(go())


if __name__ == "__main__":
    main()
