"""Turn benchmark result files into dated rows of benchmarks/RESULTS.md and a PNG plot.

    python benchmarks/record.py benchmarks/results/throughput-qwen3-0.6b.json ...
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def _fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def row(r: dict) -> str:
    if r["benchmark"] == "step_profile":
        lp = r["loop"]
        numbers = (f"batch {r['batch']}, mean context {r['mean_context']:.0f}: GPU forward (graph) "
                   f"{r['forward_graph_ms']:.2f} ms vs bandwidth floor {r['bandwidth_floor_ms']:.2f} ms; "
                   f"LM head {r['lm_head_ms']:.2f} ms, sampling {r['sample_ms']:.2f} ms GPU; host: graph "
                   f"inputs {r['graph_inputs_ms']:.2f} ms, sampling launch {r['sample_host_ms']:.2f} ms, "
                   f"schedule {lp['schedule_ms_per_step']:.2f} ms, step loop total {r['wall_ms_per_step']:.2f} ms")
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "tp_correctness":
        parts = [f"TP={tp} vs TP={r['reference_tp']}: {c['prompts_agreeing_on_first_tokens']}/{c['prompts']} prompts "
                 f"agree on the first {c['first_tokens_compared']} greedy tokens, max abs logprob diff before "
                 f"divergence {c['max_abs_logprob_diff_before_divergence']:.3f}"
                 + (f", {c['divergences_at_near_ties']} of {len(c['divergence_gaps_nats'])} divergences at "
                    f"near-ties" if "divergences_at_near_ties" in c else "")
                 for tp, c in r["vs_reference"].items()]
        numbers = "; ".join(parts) + "; start-up s " + ", ".join(
            f"TP={k}: {v:.0f}" for k, v in r["startup_s"].items()) + "; shutdown s " + ", ".join(
            f"TP={k}: {v:.1f}" for k, v in r["shutdown_s"].items())
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "agreement":
        parts = [f"{name}: {c['prompts_agreeing_on_first_tokens']}/{c['prompts']} prompts agree on all "
                 f"{c['first_tokens_compared']} greedy tokens (first divergences {c['first_divergence']}; "
                 f"{c['divergences_at_near_ties']} at near-ties), max abs logprob diff before divergence "
                 f"{c['max_abs_logprob_diff_before_divergence']:.3f}"
                 for name, c in (("vs HF", r["raylm_vs_hf"]), ("vs CPU float32", r["raylm_vs_cpu_float32"]),
                                 ("HF bf16 itself vs CPU float32", r.get("hf_vs_cpu_float32"))) if c]
        numbers = f"{r['layers']} layers, {r['dtype']}: " + "; ".join(parts)
        if "median_top2_gap_nats" in r:
            numbers = f"median top-2 gap {r['median_top2_gap_nats']:.3f} nats, " + numbers
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "serving":
        numbers = (f"{r['num_groups']} group(s) x TP={r['tensor_parallel_size']}: {r['raylm_output_tok_per_s']:.0f} "
                   f"out tok/s over HTTP, TTFT p50 {r['ttft_ms']['p50']:.0f} ms, TPOT p50 {r['tpot_ms']['p50']:.1f} ms; "
                   f"groups " + ", ".join(f"{g['requests_routed']} req / {g['busy_fraction']:.2f} busy"
                                          for g in r["groups"]))
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "quant_gemm":
        summ = r["summary"]
        fmts = sorted({k.split("@")[0] for k in summ}, key=list(r["formats"]).index)
        parts = [f"{f}: " + ", ".join(f"M={m} {summ[f'{f}@M={m}']['speedup_vs_bf16']:.2f}x"
                                      for m in r["m"] if f"{f}@M={m}" in summ) for f in fmts if f != "bf16"]
        numbers = "one Llama-3.1-8B layer's GEMMs vs bf16 cuBLAS: " + "; ".join(parts)
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "w4a16_tune":
        s = r["summary"]
        parts = []
        for layout in [name for name in ("gptq", "awq") if name in s]:
            b, bits = s[layout], []
            if "best_m1_config" in b:
                c = b["best_m1_config"]
                bits.append(f"best tile config at M=1 block_n {c['block_n']} block_k {c['block_k']} expand "
                            f"{c['expand']} warps {c['num_warps']} stages {c['num_stages']} split x{b['split_scale']}: "
                            f"{b['m1_layer_us']:.1f} us/layer ({b['m1_speedup_vs_bf16']:.2f}x bf16)")
            if "large" in b:
                bits.append(", ".join(
                    f"M={m} best fused (block_m {v['best_config']['block_m']} block_n {v['best_config']['block_n']} "
                    f"block_k {v['best_config']['block_k']} warps {v['best_config']['num_warps']}) {v['fused_us']:.0f} "
                    f"/ dequant+cuBLAS {v['dequant_us']:.0f} / bf16 {s['bf16_layer_us'][str(m)]:.0f} us"
                    for m, v in b["large"].items()))
            if "batch" in b:
                bits.append(", ".join(f"M={m} fused {v['fused_us']:.0f} / dequant+cuBLAS {v['dequant_us']:.0f} / "
                                      f"bf16 {s['bf16_layer_us'][str(m)]:.0f} us" for m, v in b["batch"].items()))
            parts.append(f"{layout}: " + "; ".join(bits))
        if "w4r" in s:
            parts.append("w4r: " + ", ".join(
                f"M={m} best (block_m {v['best_config']['block_m']} block_n {v['best_config']['block_n']} block_k "
                f"{v['best_config']['block_k']} warps {v['best_config']['num_warps']} stages "
                f"{v['best_config']['num_stages']} split x{v['split_scale']}) {v['best_us']:.0f} / shipped "
                f"{v['chosen_us']:.0f} / dequant+cuBLAS {v['dequant_us']:.0f} / bf16 {v['bf16_us']:.0f} us"
                for m, v in s["w4r"].items()))
        numbers = "one Llama-3.1-8B layer's four GEMMs: " + " | ".join(parts)
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] in ("int8_tune", "int8_tune-fp8-block"):
        parts = []
        base = r.get("baseline", "int_mm")
        base_name = {"int_mm": "torch._int_mm", "fp8_per_channel": "per-channel fp8"}.get(base, base)
        for m, v in r["summary"].items():
            c = v["best_config"]
            int_mm = f", {base_name} {v[base + '_us']:.0f}" if v.get(base + "_us") else ""
            parts.append(f"M={m} best (block_m {c['block_m']} block_n {c['block_n']} block_k {c['block_k']} "
                         f"warps {c['num_warps']} stages {c['num_stages']}) {v['best_us']:.0f} us / shipped "
                         f"{v['current_us']:.0f}{int_mm} / bf16 {v['bf16_us']:.0f} us, + act quant "
                         f"{v['act_quant_us']:.0f} us: {v['best_with_act_quant_speedup_vs_bf16']:.2f}x bf16")
        what = "int8" if r["benchmark"] == "int8_tune" else "block-scaled fp8"
        numbers = f"one Llama-3.1-8B layer's four {what} GEMMs: " + "; ".join(parts)
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "quant_throughput":
        parts = []
        for run in r["runs"]:
            for w, x in (run.get("workloads") or {}).items():
                vs_bf16 = "" if x.get("speedup_vs_bf16") is None else f"{x['speedup_vs_bf16']:.2f}x bf16, "
                parts.append(f"{run['format']} kv={run['kv_cache_dtype']} {w}: {x['output_tok_per_s']:.0f} tok/s "
                             f"({vs_bf16}{x['fraction_of_roofline']:.2f} of roofline"
                             + (f", {x['ratio_vs_trtllm_fp8']:.2f}x TRT-LLM fp8" if x.get("ratio_vs_trtllm_fp8") else "")
                             + ")")
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {'; '.join(parts)} |"
    if r["benchmark"] == "host_step":
        wires = {"none": "", "whole": " + msgpack plan and result"}
        numbers = "; ".join(f"{x['running']} sequences{wires[x['wire']]}: "
                            f"{x['host_ms_per_step']:.2f} ms host per decode step" for x in r["rows"])
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "latency":
        parts = [f"{x['prompt_len']}: TTFT {x['raylm_ttft_ms']:.1f} ms, TPOT {x['raylm_tpot_ms']:.2f} ms"
                 + (f" (HF {x['peer_ttft_ms']:.1f} / {x['peer_tpot_ms']:.2f})" if "peer_tpot_ms" in x else "")
                 for x in r["rows"]]
        numbers = ("; ".join(parts) + f"; floor TPOT {r['bandwidth_floor_tpot_ms']:.2f} ms, "
                   f"{r['fraction_of_roofline']:.2f} of it at 128")
        if r.get("tensor_parallel_size", 1) > 1:
            numbers = f"TP={r['tensor_parallel_size']}: " + numbers
    else:
        numbers = (f"raylm {_fmt(r['raylm_output_tok_per_s'])} out tok/s; HF {_fmt(r.get('peer_output_tok_per_s'))}"
                   f" ({_fmt(r.get('ratio_vs_peer'), '.1f')}x); roofline {_fmt(r['roofline_output_tok_per_s'])}"
                   f" ({r['fraction_of_roofline']:.2f}); startup {r['raylm_startup_s']:.0f} s")
        if "num_gpus" in r:
            numbers = (f"TP={r['tensor_parallel_size']} x {r['num_groups']} group(s), async_scheduling="
                       f"{r.get('async_scheduling', 'auto')}: ") + numbers
        if r.get("process_start_to_first_token_s") is not None:
            numbers += f"; process start to first token {r['process_start_to_first_token_s']:.0f} s"
        if r.get("all_reduce_ms_per_pass"):
            a = r["all_reduce_ms_per_pass"]
            numbers += (f"; all-reduce per forward pass {a['1']:.2f} / {a['256']:.2f} / {a['2048']:.2f} ms at "
                        f"1 / 256 / 2048 tokens ({r['all_reduce_share_of_step_at_256']:.2f} of a mean step)")
        if r.get("groups"):
            numbers += "; groups " + ", ".join(f"{g['steps']} steps / {g['busy_fraction']:.2f} busy" for g in r["groups"])
        t = r.get("raylm_timing")
        if t:
            numbers += (f"; per step: schedule {t['schedule_ms_per_step']:.2f} ms, execute "
                        f"{t['execute_ms_per_step']:.2f} ms, process {t['process_ms_per_step']:.2f} ms")
    return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = [r for r in results if r["benchmark"] == "throughput"]
    if not tp:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["model"] for r in tp]
    xs = range(len(tp))
    w = 0.27
    ax.bar([x - w for x in xs], [r.get("peer_output_tok_per_s") or 0 for r in tp], w, label="HF transformers")
    ax.bar(list(xs), [r["raylm_output_tok_per_s"] for r in tp], w, label="raylm")
    ax.bar([x + w for x in xs], [r["roofline_output_tok_per_s"] for r in tp], w, label="roofline")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Offline throughput, {tp[0]['device']}, {tp[0]['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(paths: list[str]) -> None:
    results = [json.load(open(p)) for p in paths]
    if not os.path.exists(RESULTS_MD):
        with open(RESULTS_MD, "w") as f:
            f.write("# Benchmark results\n\nMeasured figures only; each row names the device and command.\n\n")
    with open(RESULTS_MD, "a") as f:
        f.write("\n| date | benchmark | model | device | command | numbers |\n|---|---|---|---|---|---|\n")
        for r in results:
            f.write(row(r) + "\n")
    plot(results, os.path.join(HERE, "results", "throughput.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
