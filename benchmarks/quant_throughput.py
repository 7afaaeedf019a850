"""Offline throughput of quantized Llama-3.1-8B-shaped models (random weights) next to bf16
in the same process, on benchmarks/throughput.py's workload and on the two fixed-length
workloads of TensorRT-LLM's published FP8 H100 figures:

- formats: bf16 (always run first: the baseline); "fp8" and "int8" (engine argument
  `quantization`, the dense random weights quantized at load time); "w4a16-gptq" (a copy
  of config.json with a GPTQ quantization_config {bits 4, group_size 128, desc_act false,
  sym true} and load_format="dummy", which draws random packed weights);
- KV cache: "auto" (the model dtype) and "fp8" (engine argument kv_cache_dtype; the fp8
  runs are recorded as skipped when EngineArgs has no such field);
- workloads: "random" (throughput.py's: 256 requests, prompt and output lengths uniform in
  100-1024), "1000x1000" (512 requests, 1000 prompt / 1000 output tokens), "128x128"
  (2048 requests, 128 / 128); "batch1" (one request, 128 / 512: decode speed at batch
  size 1, where weight bytes decide); random token ids, ignore_eos, temperature 0.6.

Each format x KV dtype is one engine, started once and run on every workload. The
roofline of each run counts that format's weight bytes (1 byte per weight for fp8/int8,
0.5 + 2.5 / 128 for W4A16 g128) and KV bytes (halved for an fp8 cache), and the GEMM peak
measured for that format (bf16's for W4A16). Results are saved after every run, so a run
cut off by a time limit keeps what finished. On an H100 (2026-11-27, Llama-3.1-8B) one engine
took 4-15 s to start, then about 3 s for batch1, 15-22 s for random, 15-18 s for 128x128 and
53-71 s for 1000x1000; split the grid across commands under a 10-minute limit, e.g.

    python benchmarks/quant_throughput.py --formats fp8,int8 --kv-cache-dtypes auto --tag online
    python benchmarks/quant_throughput.py --formats w4a16-gptq --kv-cache-dtypes auto --tag gptq
    python benchmarks/quant_throughput.py --formats fp8,w4a16-gptq --kv-cache-dtypes fp8 --tag fp8kv
    python benchmarks/quant_throughput.py --runs bf16:auto,fp8:auto,fp8:fp8   # chosen pairs
    python benchmarks/quant_throughput.py --smoke          # CPU, tiny model

Writes benchmarks/results/quant_throughput[-TAG].json (or under $OUT).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

FORMATS = ("bf16", "fp8", "int8", "w4a16-gptq")
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
# name: (num_requests, (min, max) prompt length, (min, max) output length)
WORKLOADS = {"random": (256, (100, 1024), (100, 1024)),
             "1000x1000": (512, (1000, 1000), (1000, 1000)),
             "128x128": (2048, (128, 128), (128, 128)),
             "batch1": (1, (128, 128), (512, 512))}
SMOKE_WORKLOADS = {"random": (4, (8, 24), (4, 12)), "1000x1000": (3, (20, 20), (10, 10)),
                   "128x128": (6, (8, 8), (8, 8)), "batch1": (1, (8, 8), (12, 12))}
# Published, not measured here: TensorRT-LLM's performance overview, Llama-3.1-8B FP8 on
# one H100 (max-throughput settings), output tokens/s.
TRTLLM_FP8_H100 = {"source": "TensorRT-LLM performance overview (published; Llama-3.1-8B, FP8, 1x H100)",
                   "1000x1000": 15220.0, "128x128": 28312.0}
SMOKE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
                "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
                "eos_token_id": 2}


def bytes_per_weight(fmt: str) -> float:
    """Bytes read per weight of a decoder linear layer (per-channel scales neglected)."""
    return {"bf16": 2.0, "fp8": 1.0, "int8": 1.0}.get(fmt, 0.5 + 2.5 / GPTQ_CONFIG["group_size"])


def model_numbers(cfg, fmt: str, kv_cache_dtype: str) -> dict:
    """common.model_numbers with the format's weight bytes (the LM head stays bf16) and the
    KV cache dtype's bytes."""
    nums = dict(common.model_numbers(cfg))
    lm_head = cfg.vocab_size * cfg.hidden_size
    nums["weight_bytes"] = 2 * lm_head + bytes_per_weight(fmt) * (nums["params_matmul"] - lm_head)
    if kv_cache_dtype == "fp8":
        nums["kv_bytes_per_token"] //= 2
    return nums


def gptq_dir(cfg_dir: str) -> str:
    """A copy of cfg_dir's config.json with GPTQ's quantization_config."""
    cfg = json.load(open(os.path.join(cfg_dir, "config.json")))
    cfg["quantization_config"] = dict(GPTQ_CONFIG)
    d = tempfile.mkdtemp(prefix="raylm-bench-gptq-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return d


def smoke_dir() -> str:
    d = tempfile.mkdtemp(prefix="raylm-bench-smoke-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(SMOKE_CONFIG, f, indent=2)
    return d


def has_kv_cache_dtype() -> bool:
    from raylm.engine.config import EngineArgs

    return "kv_cache_dtype" in EngineArgs.field_names()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_workloads(specs: dict, names: list, vocab: int) -> dict:
    out = {}
    for i, name in enumerate(names):
        n, (plo, phi), (olo, ohi) = specs[name]
        prompts, _ = common.make_workload(n, plo, phi, vocab, seed=i)
        _, outputs = common.make_workload(n, olo, ohi, vocab, seed=100 + i)
        out[name] = (prompts, outputs)
    return out


def run_engine(args, model_dir: str, fmt: str, kv: str, workloads: dict, cfg, bandwidth, peak) -> dict:
    """One engine (format x KV dtype) on every workload."""
    from raylm import LLM, SamplingParams

    kwargs = dict(load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype, device=args.device,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, seed=0,
                  enforce_eager=args.enforce_eager)
    if args.device != "cpu":
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if fmt in ("fp8", "int8"):
        kwargs["quantization"] = fmt
    if kv != "auto":
        kwargs["kv_cache_dtype"] = kv
    run = {"format": fmt, "kv_cache_dtype": kv, "engine_args": {k: v for k, v in kwargs.items()},
           "error": None, "workloads": {}}
    t = time.perf_counter()
    llm = LLM(model_dir, **kwargs)
    run["startup_s"] = time.perf_counter() - t
    engine = llm.llm_engine
    try:
        first = next(iter(workloads.values()))[0][0]
        llm.generate([{"prompt_token_ids": first[:64]}], SamplingParams(max_tokens=8, ignore_eos=True),
                     use_tqdm=False)  # warm-up
        nums = model_numbers(cfg, fmt, kv)
        for name, (prompts, outputs) in workloads.items():
            engine.reset_timing()
            steps0, pre0 = llm.stats()["num_steps"], llm.stats()["num_preemptions"]
            sps = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=o) for o in outputs]
            _sync()
            t = time.perf_counter()
            results = llm.generate([{"prompt_token_ids": x} for x in prompts], sps, use_tqdm=False)
            _sync()
            elapsed = time.perf_counter() - t
            generated = sum(len(r.outputs[0].token_ids) for r in results)
            assert generated == sum(outputs), (generated, sum(outputs))
            stats = llm.stats()
            w = {"time_s": elapsed, "output_tokens": generated, "output_tok_per_s": generated / elapsed,
                 "steps": stats["num_steps"] - steps0, "preemptions": stats["num_preemptions"] - pre0,
                 "kv_blocks": stats["num_blocks"], "timing": engine.timing_summary()}
            if bandwidth and peak:
                w.update(common.throughput_roofline(prompts, outputs, nums, bandwidth, peak))
                w["fraction_of_roofline"] = w["output_tok_per_s"] / w["roofline_output_tok_per_s"]
            else:
                w.update({"roofline_output_tok_per_s": None, "fraction_of_roofline": None})
            run["workloads"][name] = w
            print(f"{fmt:10s} kv={kv:4s} {name:9s}: {w['output_tok_per_s']:8.0f} output tok/s "
                  f"({elapsed:.1f} s, {w['preemptions']} preemptions)", flush=True)
    finally:
        llm.shutdown()
        del llm, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return run


def compare(result: dict) -> None:
    """Speed-ups against bf16 (same KV dtype, and bf16 with the model-dtype cache), and the
    fixed-length workloads against TensorRT-LLM's published FP8 figures."""
    runs = [r for r in result["runs"] if not r.get("error") and not r.get("skipped")]
    base = {(r["kv_cache_dtype"], name): w["output_tok_per_s"]
            for r in runs if r["format"] == "bf16" for name, w in r["workloads"].items()}
    rows = []
    for r in runs:
        for name, w in r["workloads"].items():
            same_kv, auto_kv = base.get((r["kv_cache_dtype"], name)), base.get(("auto", name))
            w["speedup_vs_bf16_same_kv"] = w["output_tok_per_s"] / same_kv if same_kv else None
            w["speedup_vs_bf16"] = w["output_tok_per_s"] / auto_kv if auto_kv else None
            trt = TRTLLM_FP8_H100.get(name)
            w["ratio_vs_trtllm_fp8"] = w["output_tok_per_s"] / trt if trt else None
            rows.append({"workload": name, "format": r["format"], "kv_cache_dtype": r["kv_cache_dtype"],
                         "output_tok_per_s": w["output_tok_per_s"], "speedup_vs_bf16": w["speedup_vs_bf16"],
                         "fraction_of_roofline": w["fraction_of_roofline"],
                         "trtllm_fp8_h100_output_tok_per_s": trt, "ratio_vs_trtllm_fp8": w["ratio_vs_trtllm_fp8"]})
    result["comparison"] = rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="a name under benchmarks/models or a dir with config.json")
    p.add_argument("--formats", default="fp8,int8,w4a16-gptq", help=f"besides bf16; from {FORMATS[1:]}")
    p.add_argument("--kv-cache-dtypes", default="auto,fp8")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 baseline")
    p.add_argument("--runs", default="", help="FORMAT:KV pairs in order (e.g. bf16:auto,fp8:fp8), "
                   "instead of the grid of --formats (after bf16) x --kv-cache-dtypes")
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random model, a few requests")
    args = p.parse_args()

    from transformers import AutoConfig

    if args.runs:
        pairs = [tuple(p.split(":")) if ":" in p else (p, "auto") for p in args.runs.split(",") if p]
        formats = list(dict.fromkeys(f for f, _ in pairs))
    else:
        formats = (["bf16"] if not args.no_bf16 else []) + [f for f in args.formats.split(",") if f and f != "bf16"]
        pairs = [(f, kv) for kv in args.kv_cache_dtypes.split(",") if kv for f in formats]
    for f, kv in pairs:
        if f not in FORMATS:
            raise SystemExit(f"--formats/--runs: {f!r} is not one of {FORMATS}")
        if kv not in ("auto", "fp8"):
            raise SystemExit(f"--kv-cache-dtypes/--runs: {kv!r} is not one of ('auto', 'fp8')")
    specs = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    names = [w for w in args.workloads.split(",") if w]
    for w in names:
        if w not in specs:
            raise SystemExit(f"--workloads: {w!r} is not one of {list(specs)}")
    if args.smoke:
        args.device, args.dtype, args.max_model_len, model_name = "cpu", "float32", 128, "smoke-llama"
        cfg_dir = smoke_dir()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU; --smoke runs a tiny model on CPU")
        args.device, args.dtype, model_name = "cuda", "bfloat16", args.model
        cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    workloads = make_workloads(specs, names, cfg.vocab_size)

    result = common.base_result("quant_throughput", model_name)
    kv_ok = has_kv_cache_dtype()
    result.update({
        "weights": "random (load_format dummy); fp8/int8 quantized online at load",
        "dtype": args.dtype, "gptq_quantization_config": GPTQ_CONFIG, "temperature": args.temperature,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_dtype_supported": kv_ok,
        "workloads": {n: {"num_requests": specs[n][0], "prompt_len": specs[n][1], "output_len": specs[n][2],
                          "prompt_tokens": sum(len(x) for x in workloads[n][0]),
                          "output_tokens": sum(workloads[n][1])} for n in names},
        "published": {"trtllm_fp8_h100_output_tok_per_s": TRTLLM_FP8_H100},
    })
    if args.smoke:
        bandwidth, peaks = None, {f: None for f in formats}
    else:
        from benchmarks.quant_gemm import measure_format_peak

        bandwidth = common.measure_bandwidth()
        bf16_peak = common.measure_matmul_peak()
        peaks = {f: bf16_peak if f in ("bf16", "w4a16-gptq") else measure_format_peak(f.replace("int8", "w8a8-int8"))
                 for f in formats}
        print(f"measured: copy {bandwidth / 1e12:.2f} TB/s; GEMM peaks "
              + ", ".join(f"{f} {v / 1e12:.0f} TFLOP/s" for f, v in peaks.items()), flush=True)
    result["measured_bandwidth_Bps"] = bandwidth
    result["measured_peak_flops"] = peaks
    result["runs"] = []
    stem = "quant_throughput" + ("-smoke" if args.smoke else "") + (f"-{args.tag}" if args.tag else "")
    gptq = gptq_dir(cfg_dir)
    for fmt, kv in pairs:
        if kv != "auto" and not kv_ok:
            result["runs"].append({"format": fmt, "kv_cache_dtype": kv, "error": None,
                                   "skipped": "EngineArgs has no kv_cache_dtype field", "workloads": {}})
            continue
        model_dir = gptq if fmt == "w4a16-gptq" else cfg_dir
        try:
            run = run_engine(args, model_dir, fmt, kv, workloads, cfg, bandwidth, peaks[fmt])
        except Exception as e:  # noqa: BLE001 - record and go on to the other formats
            traceback.print_exc()
            run = {"format": fmt, "kv_cache_dtype": kv, "error": f"{type(e).__name__}: {e}", "workloads": {}}
        result["runs"].append(run)
        compare(result)
        _save_quietly(result, stem)  # what finished survives a time limit
    compare(result)
    common.save_result(result, stem)


def _save_quietly(result: dict, stem: str) -> None:
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    path = os.path.join(os.environ.get("OUT") or common.RESULTS_DIR, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
