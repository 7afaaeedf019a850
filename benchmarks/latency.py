"""Single-request latency: time to first token (TTFT) and time per output token (TPOT) at
prompt lengths 128, 2k and 8k, raylm and HF transformers on the same random bf16 weights,
against the bandwidth floor (weight bytes / measured copy bandwidth).

    python benchmarks/latency.py --model llama-3.1-8b
    python benchmarks/latency.py --model llama-3.1-8b --tensor-parallel-size 2 --peer none

At --tensor-parallel-size N the floor is the weight bytes over N GPUs' bandwidth.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


def raylm_latency(llm, prompt: list[int], out_len: int, reps: int) -> tuple[float, float]:
    from raylm import SamplingParams

    engine = llm.llm_engine
    ttfts, tpots = [], []
    for r in range(reps):
        rid = f"lat-{len(prompt)}-{r}"
        # Prefix caching off for the measurement: every rep prefills the whole prompt.
        engine.add_request(rid, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and outs:
                first = time.perf_counter()
        end = time.perf_counter()
        ttfts.append(first - t0)
        tpots.append((end - first) / (out_len - 1))
    return statistics.median(ttfts), statistics.median(tpots)


@torch.inference_mode()
def hf_latency(model, prompt: list[int], out_len: int, reps: int) -> tuple[float, float]:
    ids = torch.tensor([prompt], device="cuda")
    ttfts, totals = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        ttfts.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                       pad_token_id=0)
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - t)
    ttft = statistics.median(ttfts)
    return ttft, (statistics.median(totals) - ttft) / (out_len - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--prompt-lens", default="128,2048,8192")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--peer", choices=["hf", "none"], default="hf")
    args = p.parse_args()
    tp = args.tensor_parallel_size
    if tp > 1 and args.peer == "hf":
        raise SystemExit("--peer hf needs the weights in this process: use --peer none with "
                         "--tensor-parallel-size above 1 (compare with a TP=1 run)")

    from transformers import AutoConfig

    from raylm import LLM, SamplingParams

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    import random
    rng = random.Random(0)
    prompts = [[rng.randint(0, cfg.vocab_size - 1) for _ in range(n)] for n in lens]
    bandwidth = common.measure_bandwidth()
    nums = common.model_numbers(cfg)
    bandwidth_all = tp * bandwidth  # each rank reads its shard at one GPU's bandwidth
    floor_s = nums["weight_bytes"] / bandwidth_all

    hf = common.hf_model_on_gpu(cfg) if args.peer == "hf" else None
    t = time.perf_counter()
    llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.max_model_len, max_num_seqs=16, enable_prefix_caching=False,
              max_num_batched_tokens=max(lens) + 64, gpu_memory_utilization=0.85, seed=0,
              attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
              tensor_parallel_size=tp)
    startup_s = time.perf_counter() - t
    if hf is not None:
        common.copy_weights_into_raylm(llm, hf)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)  # warm-up

    rows = []
    for n, prompt in zip(lens, prompts):
        ttft, tpot = raylm_latency(llm, prompt, args.output_len, args.reps)
        row = {"prompt_len": n, "raylm_ttft_ms": 1e3 * ttft, "raylm_tpot_ms": 1e3 * tpot,
               "floor_tpot_ms": 1e3 * (nums["weight_bytes"] + (n + args.output_len // 2)
                                       * nums["kv_bytes_per_token"]) / bandwidth_all}
        print(row, flush=True)
        rows.append(row)
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    if hf is not None:
        for row, prompt in zip(rows, prompts):
            ttft, tpot = hf_latency(hf, prompt, args.output_len, args.reps)
            row.update(peer_ttft_ms=1e3 * ttft, peer_tpot_ms=1e3 * tpot)
            print(row, flush=True)

    result = common.base_result("latency", args.model)
    first = rows[0]
    result.update({
        "rows": rows, "output_len": args.output_len, "raylm_startup_s": startup_s,
        "bandwidth_floor_tpot_ms": 1e3 * floor_s, "measured_bandwidth_Bps": bandwidth,
        # The summary fields every result carries: batch-1 decode at the shortest prompt.
        "raylm_output_tok_per_s": 1e3 / first["raylm_tpot_ms"],
        "peer": None if hf is None else f"transformers {__import__('transformers').__version__} generate (sdpa, bf16, batch 1)",
        "peer_output_tok_per_s": None if hf is None else 1e3 / first["peer_tpot_ms"],
        "roofline_output_tok_per_s": 1e3 / first["floor_tpot_ms"],
        "fraction_of_roofline": first["floor_tpot_ms"] / first["raylm_tpot_ms"],
        "enforce_eager": args.enforce_eager, "tensor_parallel_size": tp,
        "attention_backend": args.attention_backend or "auto",
    })
    backend = f"-{args.attention_backend}" if args.attention_backend not in (None, "auto") else ""
    common.save_result(result, f"latency-{args.model}" + (f"-tp{tp}" if tp > 1 else "") + backend)


if __name__ == "__main__":
    main()
