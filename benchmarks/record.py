"""Benchmark result files -> the current-state tables that open benchmarks/RESULTS.md.

    python benchmarks/record.py --write        # regenerate the block between the markers
    python benchmarks/record.py --check        # exit 1 when the block is not what the JSON gives
    python benchmarks/record.py                # print the block
    python benchmarks/record.py FILE.json ...  # one summary line per record (changes no file)
    python benchmarks/record.py --plot PNG     # raylm beside its peer, offline and over HTTP

Every JSON file under benchmarks/results/ (subfolders included) holds one record or a list
of records. Each benchmark has a table with one row per configuration (model, device, TP,
groups, format, workload...): the row of the newest record by date. A record stays out when
it has "superseded_by" (what replaced it, for a rerun the same day) or "dropped" (why it was
dropped), or was a --smoke run; one of its rows stays out when "superseded_rows" names it
({row id: what replaced it}; the ids are in the sections below). Two records of one date
for the same configuration are an error: mark the older one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Callable, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
RESULTS_DIR = os.path.join(HERE, "results")
BEGIN = "<!-- current-state:begin -->"
END = "<!-- current-state:end -->"
PEERS = {"vllm-0.26.0": "vLLM 0.26.0", "hf": "HF transformers"}


def _peer_name(peer: str | None) -> str:
    return PEERS.get(peer, peer or "-")


def _notes(*parts) -> str:
    """The non-empty parts of a note, joined."""
    return "; ".join(x for x in parts if x)


def _fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def row(r: dict) -> str:
    if r["benchmark"] == "host_scaling":
        runs = "; ".join(f"G={x['num_groups']}: {x['raylm_output_tok_per_s']:.0f} tok/s "
                         f"({x['ratio_to_linear']:.2f} of linear)" for x in r["runs"])
        return (f"| {r['date']} | host_scaling | stand-in, {r['step_ms']:g} ms steps | {r['device']} | "
                f"`{r['command']}` | {runs} |")
    if r["benchmark"] == "front_door":
        h = r["health_ms_during_streams"]
        numbers = (f"/health p50 {_ms(h['p50'])} / p99 {_ms(h['p99'])} / max {_ms(h['max'])} ms over {h['count']} "
                   f"probes during {r['streams']} streams; {r['bodies_413']} of {r['bodies']} over-limit bodies "
                   f"413; streams {r['streams_completed']} completed, {r['streams_failed']} failed; "
                   f"{r['responses_5xx']} responses >= 500")
        return (f"| {r['date']} | front_door | stand-in, {r['step_ms']:g} ms steps | {r['device']} | "
                f"`{r['command']}` | {numbers} |")
    if r["benchmark"] == "fault":
        numbers = (f"{r['num_groups']} groups, {r['concurrency']} streams, group 0's core SIGKILLed at "
                   f"{r['kill_at_s']:.0f} s: {r['pre_kill_mean_tok_per_s']:.0f} out tok/s before, dip "
                   f"{r['dip_tok_per_s']:.0f}, back to >= 90 % in {_fmt(r['recovery_s'], '.1f')} s; restart "
                   f"{_fmt(r['restart_s'], '.1f')} s; {r['requests_completed']} requests completed, "
                   f"{r['requests_failed']} failed, {r['requests_redispatched']:.0f} re-dispatched")
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
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
                   f"out tok/s over HTTP, TTFT p50 {_fmt((r.get('ttft_ms') or {}).get('p50'))} ms, TPOT p50 "
                   f"{_fmt((r.get('tpot_ms') or {}).get('p50'), '.1f')} ms")
        if r.get("groups"):
            numbers += "; groups " + ", ".join(f"{g['requests_routed']} req / {g['busy_fraction']:.2f} busy"
                                               for g in r["groups"])
        if r.get("peer_output_tok_per_s"):
            numbers += f"; {_peer_name(r['peer'])} {r['peer_output_tok_per_s']:.0f} out tok/s"
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
    if r["benchmark"] == "ray_overhead":
        numbers = f"median one-token decode step, batch {r['config']['batch']}, ms: " + ", ".join(
            f"{k} {v['median_ms']}" for k, v in r["results"].items() if "median_ms" in v)
        return f"| {r['date']} | {r['benchmark']} | - | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "output_channel":
        numbers = "; ".join(f"{x['path']}: {x['total_cpu_us_per_batch']} us of CPU a batch" for x in r["rows"])
        return f"| {r['date']} | {r['benchmark']} | - | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "host_step":
        wires = {"none": "", "whole": " + msgpack plan and result"}
        numbers = "; ".join(f"{x['running']} sequences{wires[x['wire']]}: "
                            f"{x['host_ms_per_step']:.2f} ms host per decode step" for x in r["rows"])
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "spec_decode":
        numbers = (f"{r['method']} k={r['num_speculative_tokens']}, batch {r['batch_size']}, {r['workload']}: "
                   f"acceptance {r['acceptance_rate']:.2f}, {_fmt(r['raylm_output_tok_per_s'], '.1f')} out tok/s vs "
                   f"{_fmt(r['baseline_output_tok_per_s'], '.1f')} without ({r['speedup']:.2f}x)")
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "startup":
        spans = ", ".join(f"{x['who']} {x['phase']} {x['s']:.1f} s" for x in r["longest_spans"][:3])
        numbers = f"process start to first served request {r['startup_s']:.1f} s; longest: {spans}"
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "mixed_attention_split":
        numbers = "; ".join(f"{x['model']} {x['ndec']} decodes at {x['ctx']} + {x['pre_q']}-token chunk: one launch "
                            f"{x['full_us']:.0f} us, split {x['split_us']:.0f} us" for x in r["rows"])
        return f"| {r['date']} | {r['benchmark']} | - | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "attention_tiles":
        points = _attention_tiles(r)
        numbers = "; ".join(f"{row.cells[0]} {row.cells[1]} {row.cells[3]}: default {row.cells[5]} us "
                            f"(baseline {row.cells[4]}), fastest {row.cells[8]} ({row.cells[7]})" for row in points)
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "decode_tile_sweep":
        numbers = "; ".join(f"{x['n']} x {x['ctx']}: default {x['default_us']:.0f} us, best {x['best_us']:.0f} "
                            f"({x['best']}), floor {x['floor_us']:.0f}" for x in r["rows"])
        return f"| {r['date']} | {r['benchmark']} | llama-3.1-8b | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "structured":
        numbers = (f"structured {r['structured_output_tok_per_s']:.0f} / unconstrained "
                   f"{r['unconstrained_output_tok_per_s']:.0f} out tok/s; step p50 {r['structured_step_ms_p50']:.1f} / "
                   f"{r['unconstrained_step_ms_p50']:.1f} ms; compile p99 {r['compile_ms_p99']:.1f} ms")
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "gpu_step_breakdown":
        fams = ", ".join(f"{k} {v:.2f}" for k, v in list(r["families_ms_per_step"].items())[:4])
        tops = ", ".join(f"{k.split('(')[0][:32]} {v:.2f}" for k, v in list(r["top_kernels_ms_per_step"].items())[:3])
        numbers = (f"{r['profile_steps']} steps at {r['concurrency']} in flight ({r['mixed_steps']} mixed): GPU kernels "
                   f"{r['gpu_kernel_ms_per_step']:.1f} ms a step ({fams}); top kernels {tops} ms")
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "gemv":
        ops = {}
        for x in r["rows"]:
            ops.setdefault(x["op"], []).append(x)
        parts = []
        for op, xs in ops.items():
            # cuBLAS's row ("cublas", or "cublas + silu" for the gate/up product with SiLU-and-mul)
            cublas = next(x for x in xs if x["backend"].startswith("cublas"))
            best = min((x for x in xs if x is not cublas), key=lambda x: x["us"])
            parts.append(f"{op} {cublas['n']}x{cublas['k']}: {cublas['backend'].replace('cublas', 'cuBLAS')} "
                         f"{cublas['us']:.1f} us, {best['backend']} {best['us']:.1f} us ({best['tb_per_s']:.2f} TB/s)")
        numbers = "; ".join(parts)
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "attention":
        numbers = "; ".join(f"{op} {batch}x{ctx}: {p['best'][1]} {p['best'][0]:.1f} us"
                            for (op, batch, ctx, _), p in _attention_points(r).items() if p["best"])
        return f"| {r['date']} | {r['benchmark']} | {r['model']} | {r['device']} | `{r['command']}` | {numbers} |"
    if r["benchmark"] == "latency":
        parts = [f"{x['prompt_len']}: TTFT {x['raylm_ttft_ms']:.1f} ms, TPOT {x['raylm_tpot_ms']:.2f} ms"
                 + (f" ({_peer_name(r.get('peer') or 'hf')} {x['peer_ttft_ms']:.1f} / {x['peer_tpot_ms']:.2f})"
                    if "peer_tpot_ms" in x else "")
                 for x in r["rows"]]
        numbers = "; ".join(parts)
        if r.get("bandwidth_floor_tpot_ms"):
            numbers += (f"; floor TPOT {r['bandwidth_floor_tpot_ms']:.2f} ms, "
                        f"{r['fraction_of_roofline']:.2f} of it at 128")
        if r.get("tensor_parallel_size", 1) > 1:
            numbers = f"TP={r['tensor_parallel_size']}: " + numbers
    elif r["benchmark"] == "sampling":
        numbers = "; ".join(f"{x['setting']}: raylm {x['raylm_ms']:.2f} ms, HF warpers {x['peer_ms']:.2f} ms "
                            f"({x['speedup']:.1f}x)" for x in r["rows"])
    else:
        ours, peer = r["raylm_output_tok_per_s"], r.get("peer_output_tok_per_s")
        numbers = (f"raylm {_fmt(ours)} out tok/s; {_peer_name(r.get('peer') or 'hf')} {_fmt(peer)} "
                   f"({_ratio(ours, peer)}); roofline {_fmt(r.get('roofline_output_tok_per_s'))} "
                   f"({_fmt(r.get('fraction_of_roofline'), '.2f')}); startup {_fmt(r.get('raylm_startup_s'))} s")
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


# ---- the current state --------------------------------------------------------------------------
def load_records(results_dir: str = RESULTS_DIR) -> list[dict]:
    """Every record under results_dir, each with "_path" (its file, relative to results_dir)."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "*.json"), recursive=True)):
        with open(path) as f:
            data = json.load(f)
        rel = os.path.relpath(path, results_dir).replace(os.sep, "/")
        out += [dict(r, _path=rel) for r in (data if isinstance(data, list) else [data])
                if isinstance(r, dict) and "benchmark" in r]
    return out


def _left_out(r: dict) -> bool:
    return bool(r.get("superseded_by") or r.get("dropped")) or "--smoke" in r.get("command", "")


def _n(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _tp_groups(r: dict) -> tuple[int, int]:
    return r.get("tensor_parallel_size") or 1, r.get("num_groups") or 1


class Row(NamedTuple):
    key: tuple      # the configuration: the table keeps the newest record's row per key
    id: str         # the row's name in a record's "superseded_rows"
    cells: list     # one per column; a dict spreads over the columns its keys name
    note: str = ""


class Section(NamedTuple):
    title: str
    intro: str
    benchmarks: tuple[str, ...]
    columns: list[str]          # "{}" in one of them: that column repeats per key of the dict cell
    rows: Callable[[dict], list[Row]]


def _throughput(r: dict) -> list[Row]:
    tp, g = _tp_groups(r)
    off = r.get("async_scheduling") == "off"
    requests = r.get("num_requests") or 256
    ours, peer = r.get("raylm_output_tok_per_s"), r.get("peer_output_tok_per_s")
    startup = _n(r.get("raylm_startup_s"))
    if r.get("process_start_to_first_token_s") is not None:
        startup += f" ({r['process_start_to_first_token_s']:.0f} from process start)"
    backend = r.get("attention_backend")
    top_p = r.get("top_p", 1.0)
    return [Row((r["model"], r["device"], tp, g, requests, off, backend or "", top_p), "",
                [r["model"], r["device"], f"{tp} x {g}", requests, _n(ours),
                 _peer_name(r.get("peer")) if peer else "-", _n(peer), _ratio(ours, peer),
                 _n(r.get("fraction_of_roofline"), 2), startup],
                _notes("asynchronous scheduling off" if off else "",
                       f"attention_backend {backend}" if backend else "",
                       f"top_p {top_p}" if top_p < 1.0 else ""))]


def _latency_cell(stats: dict | None, q: str, peer=None, peer_name: str = "") -> str:
    s = _ms((stats or {}).get(q))
    return s + (f" ({peer_name} {_ms(peer)})" if peer is not None else "")


def _serving(r: dict) -> list[Row]:
    tp, g = _tp_groups(r)
    mode = r.get("mode") or "closed-loop"
    conc = r.get("max_concurrency")
    load = (f"{r['num_requests']} at concurrency {conc}" if mode == "closed-loop"
            else f"{r['num_requests']}, Poisson arrivals at {r['request_rate']:.1f} req/s")
    ours, peer = r.get("raylm_output_tok_per_s"), r.get("peer_output_tok_per_s")
    pl, pn = r.get("peer_latency_ms") or {}, _peer_name(r.get("peer")).split()[0]
    if r.get("startup_s_range"):
        lo, hi = r["startup_s_range"]
        startup = f"{lo}-{hi}"
        if r.get("peer_startup_s_range"):
            startup += f" ({pn} {r['peer_startup_s_range'][0]}-{r['peer_startup_s_range'][1]})"
    else:
        startup = _n(r.get("startup_s"))
    busy = ", ".join(f"{x['busy_fraction']:.2f}" for x in r.get("groups") or [])
    share = r.get("num_gpus_per_worker") or 1
    note = _notes(f"{g} groups sharing one GPU" if share < 1 else "", f"cores in steps {busy}" if busy else "",
                  f"attention_backend {r['attention_backend']}" if r.get("attention_backend") else "")
    return [Row((r["model"], r["device"], tp, g, share, r["num_requests"], conc, r.get("min_len"), r.get("max_len"),
                 mode, r.get("attention_backend") or ""),
                mode,
                [r["model"], r["device"], f"{tp} x {g}", load, f"{r.get('min_len', '-')}-{r.get('max_len', '-')}",
                 _n(ours), _peer_name(r.get("peer")) if peer else "-", _n(peer), _ratio(ours, peer),
                 _latency_cell(r.get("ttft_ms"), "p50", pl.get("ttft_p50_ms"), pn),
                 _latency_cell(r.get("tpot_ms"), "p50", pl.get("tpot_p50_ms"), pn),
                 _latency_cell(r.get("itl_ms"), "p99", pl.get("itl_p99_ms"), pn), startup],
                note)]


def _host_scaling(r: dict) -> list[Row]:
    return [Row((r["device"], x["num_groups"]), str(x["num_groups"]),
                [r["device"], f"{r['step_ms']:g} ms", x["num_groups"], x["max_concurrency"],
                 _n(x["raylm_output_tok_per_s"]), f"{x['ratio_to_linear']:.2f}",
                 _ms(x["tpot_ms"]["p50"]), _ms(x["itl_ms"]["p99"]),
                 ", ".join(f"{b:.2f}" for b in x["core_busy_fraction"]), _cpu_per_token(x.get("cpu_us_per_token"))],
                r.get("note", "")) for x in r["runs"]]


def _cpu_per_token(c: dict | None) -> str:
    if not c:
        return "-"
    return f"{c['total']:.0f} ({' / '.join(_n(c[k]) for k in ('ingress', 'core', 'router', 'clients'))})"


def _fault(r: dict) -> list[Row]:
    step = f"{r['step_ms']:g} ms" if r.get("standin") else "-"
    return [Row((r["model"], r["device"], step, r["num_groups"], r["concurrency"]), "",
                [r["model"], r["device"], step, r["num_groups"], r["concurrency"], _n(r["pre_kill_mean_tok_per_s"]),
                 f"{_n(r['dip_tok_per_s'])} ({r['dip_tok_per_s'] / r['pre_kill_mean_tok_per_s']:.2f})",
                 _n(r["recovery_s"], 1), _n(r["restart_s"], 1), r["requests_completed"], r["requests_failed"],
                 _n(r["requests_redispatched"])])]


def _front_door(r: dict) -> list[Row]:
    def three(x: dict | None) -> str:
        return "-" if not x else f"{_ms(x['p50'])} / {_ms(x['p99'])} / {_ms(x['max'])}"

    h = r["health_ms_during_streams"]
    return [Row((r["device"], r["step_ms"], r["streams"]), "",
                [r["device"], f"{r['step_ms']:g} ms", r["streams"], r["output_len"],
                 f"{r['bodies_413']} of {r['bodies']}", three(h), three(r["health_ms_while_bodies_sent"]),
                 three(r.get("version_ms_during_streams")), three(r["health_ms_idle_before"]), h["count"],
                 f"{r['streams_completed']} / {r['streams_failed']}", r["responses_5xx"]],
                f"load average {r['load_average_1m_at_start']:g} at the start"
                if r.get("load_average_1m_at_start") is not None else "")]


def _latency(r: dict) -> list[Row]:
    tp = r.get("tensor_parallel_size") or 1
    rows = []
    for x in r["rows"]:
        peer = (f"{_peer_name(r.get('peer') or 'hf')}: {_ms(x['peer_ttft_ms'])} / {_ms(x['peer_tpot_ms'])}"
                if x.get("peer_tpot_ms") is not None else "-")
        backend = r.get("attention_backend") or ""
        rows.append(Row((r["model"], r["device"], tp, x["prompt_len"], backend), str(x["prompt_len"]),
                        [r["model"], r["device"], tp, x["prompt_len"], _ms(x["raylm_ttft_ms"]),
                         _ms(x["raylm_tpot_ms"]), peer, _ms(x.get("floor_tpot_ms"))],
                        f"attention_backend {backend}" if backend else ""))
    return rows


def _quant_throughput(r: dict) -> list[Row]:
    bf16 = next((run["workloads"] for run in r["runs"]
                 if (run["format"], run["kv_cache_dtype"]) == ("bf16", "auto") and run.get("workloads")), {})
    trt = (r.get("published") or {}).get("trtllm_fp8_h100_output_tok_per_s") or {}
    rows = []
    for run in r["runs"]:
        fmt, kv = run["format"], run["kv_cache_dtype"]
        if (fmt, kv) == ("bf16", "auto") or not run.get("workloads"):
            continue
        for w, x in run["workloads"].items():
            ours, base = x["output_tok_per_s"], (bf16.get(w) or {}).get("output_tok_per_s")
            peer = f"{trt[w]:,.0f} ({ours / trt[w]:.2f}x)" if trt.get(w) else "-"
            rows.append(Row((r["model"], r["device"], fmt, kv, w, r.get("max_num_seqs")), f"{fmt}:{kv} {w}",
                            [r["model"], r["device"], fmt, kv, w, r.get("max_num_seqs"), _n(ours), _n(base),
                             _ratio(ours, base), peer, x.get("preemptions", "-")]))
    return rows


def _quant_gemm(r: dict) -> list[Row]:
    s = r["summary"]
    return [Row((r["device"], f), f,
                [r["device"], f, {m: (f"{s[f'{f}@M={m}']['speedup_vs_bf16']:.2f}x" if f"{f}@M={m}" in s else "-")
                                  for m in r["m"]}])
            for f in r["formats"] if f != "bf16"]


def _int8_tune(r: dict) -> list[Row]:
    what = "int8 (W8A8)" if r["benchmark"] == "int8_tune" else "block-scaled fp8"
    base = r.get("baseline", "int_mm")
    base_name = {"int_mm": "torch._int_mm", "fp8_per_channel": "per-channel fp8"}.get(base, base)
    rows = []
    for m, v in r["summary"].items():
        c = v["best_config"]
        tile = f"{c['block_m']}x{c['block_n']}x{c['block_k']}, {c['num_warps']} warps, {c['num_stages']} stages"
        other = f"{base_name} {_n(v.get(base + '_us'))}" if v.get(base + "_us") else "-"
        rows.append(Row((r["device"], what, int(m)), f"M={m}",
                        [r["device"], what, int(m), tile, _n(v["best_us"]), _n(v["bf16_us"]), other,
                         _n(v["act_quant_us"]), f"{v['best_with_act_quant_speedup_vs_bf16']:.2f}x"]))
    return rows


def _w4a16_tune(r: dict) -> list[Row]:
    s, rows = r["summary"], []

    def add(layout, m, fused, dequant, bf16, tile=""):
        rows.append(Row((r["device"], layout, int(m)), f"{layout} M={m}",
                        [r["device"], layout, int(m), tile, _n(fused), _n(dequant), _n(bf16), _ratio(bf16, fused)]))
    for m, v in (s.get("w4r") or {}).items():
        c = v["best_config"]
        add("w4r", m, v["best_us"], v["dequant_us"], v["bf16_us"],
            f"{c['block_m']}x{c['block_n']}x{c['block_k']}, {c['num_warps']} warps, split x{v['split_scale']}")
    for layout in ("gptq", "awq"):
        b = s.get(layout) or {}
        if "m1_layer_us" in b:
            add(layout, 1, b["m1_layer_us"], None, s["bf16_layer_us"]["1"])
        for m, v in {**(b.get("batch") or {}), **(b.get("large") or {})}.items():
            add(layout, m, v["fused_us"], v["dequant_us"], s["bf16_layer_us"].get(str(m)))
    return rows


def _tp_correctness(r: dict) -> list[Row]:
    rows = []
    for tp, c in r["vs_reference"].items():
        near = (f"{c['divergences_at_near_ties']} of {len(c['divergence_gaps_nats'])}"
                if "divergences_at_near_ties" in c else "-")
        rows.append(Row((r["model"], r["device"], int(tp)), f"TP={tp}",
                        [r["model"], r["device"], f"TP={tp} vs TP={r['reference_tp']}",
                         f"{c['prompts_agreeing_on_first_tokens']}/{c['prompts']} (first {c['first_tokens_compared']})",
                         f"{c['max_abs_logprob_diff_before_divergence']:.3f}", near,
                         _n(r["startup_s"].get(tp)), _n(r["shutdown_s"].get(tp), 1)]))
    return rows


def _agreement_cell(c: dict | None) -> str:
    if not c:
        return "-"
    agree, n = c["prompts_agreeing_on_first_tokens"], c["prompts"]
    return (f"{agree}/{n} agree on {c['first_tokens_compared']} tokens; max diff "
            f"{c['max_abs_logprob_diff_before_divergence']:.3f}; {c['divergences_at_near_ties']} of {n - agree} "
            f"divergences at near-ties")


def _agreement(r: dict) -> list[Row]:
    return [Row((r["model"], r["device"], r["layers"], r.get("logit_scale") or 1.0), "",
                [r["model"], r["device"], f"{r['layers']} layers, {r['dtype']}", _agreement_cell(r["raylm_vs_hf"]),
                 _agreement_cell(r["raylm_vs_cpu_float32"]), _agreement_cell(r.get("hf_vs_cpu_float32")),
                 _n(r.get("median_top2_gap_nats"), 3)])]


def _step_profile(r: dict) -> list[Row]:
    lp = r["loop"]
    return [Row((r["model"], r["device"], r["batch"]), "",
                [r["model"], r["device"], r["batch"], f"{r['mean_context']:.0f}", f"{r['wall_ms_per_step']:.2f}",
                 f"{r['forward_graph_ms']:.2f}", f"{r['bandwidth_floor_ms']:.2f}",
                 f"{r['lm_head_ms']:.2f} / {r['sample_ms']:.2f}",
                 f"{lp['schedule_ms_per_step']:.2f} / {lp['process_ms_per_step']:.2f} / {r['graph_inputs_ms']:.2f}"])]


def _gpu_step_breakdown(r: dict) -> list[Row]:
    fams = r["families_ms_per_step"]
    top = ", ".join(f"{k.split('(')[0][:28]} {v:.2f}" for k, v in list(r["top_kernels_ms_per_step"].items())[:3])
    calls = r.get("kernel_calls_per_step")
    return [Row((r["model"], r["device"], r.get("attention_backend", "default"), r.get("concurrency", 256)), "",
                [r["model"], r["device"], r.get("attention_backend", "default"), r.get("concurrency", 256),
                 f"{r['profile_steps']} ({r['mixed_steps']} mixed)", f"{r['gpu_kernel_ms_per_step']:.2f}",
                 f"{sum(v for k, v in fams.items() if k.startswith('gemm')):.2f}",  # "gemm + activation" too
                 "-" if calls is None else f"{calls:.0f}", top])]


def _structured(r: dict) -> list[Row]:
    # The grammar library, and how the run differs from the default: every schema compiled
    # before it (--precompiled), grammar steps not pipelined (--no-pipeline).
    backend = (r.get("backend", "xgrammar") + ("; schemas precompiled" if r.get("precompiled") else "")
               + ("; not pipelined" if r.get("pipelined") is False else "")
               + (f"; grammar threads {r['grammar_threads']}" if r.get("grammar_threads") else "")
               + ("; traced" if r.get("trace") else ""))
    if r.get("structured_full_batch_step_ms_p50") and r.get("unconstrained_full_batch_step_ms_p50"):
        step = (f"{r['structured_full_batch_step_ms_p50']:.1f} / {r['unconstrained_full_batch_step_ms_p50']:.1f} "
                "(full batch)")
    else:
        step = f"{r['structured_step_ms_p50']:.1f} / {r['unconstrained_step_ms_p50']:.1f}"
    return [Row((r["model"], r["device"], backend, r["num_requests"]), "",
                [r["model"], r["device"], backend, r["num_requests"], f"{r['structured_output_tok_per_s']:,.0f}",
                 f"{r['unconstrained_output_tok_per_s']:,.0f}", f"{r['ratio_structured_vs_unconstrained']:.2f}",
                 step, f"{r['compile_ms_p50']:.1f} / {r['compile_ms_p99']:.1f}",
                 "-" if r.get("step_ms_p99_while_compiling") is None else f"{r['step_ms_p99_while_compiling']:.1f}",
                 _compile_probe(r.get("compile_probe")),
                 f"{r['stopped_valid']} of {r['num_requests']}"])]  # the record's label joins the note


def _compile_probe(p: dict | None) -> str:
    """The compile probe's cell: until every new-schema request has a token, the window and
    its step p99, structured against the same requests unconstrained, beside the steady batch."""
    if not p:
        return "-"
    return (f"{p['probe_requests']} beside {p['background_requests']} (steps {p['background_step_ms_p99']:.1f}): "
            f"{1e3 * p['structured_window_s']:.0f} / {1e3 * p['unconstrained_window_s']:.0f} ms, step p99 "
            f"{p['structured_step_ms_p99']:.1f} / {p['unconstrained_step_ms_p99']:.1f}")


def _sampling(r: dict) -> list[Row]:
    def fi(x: dict) -> str:
        if x.get("flashinfer_ms") is None:
            return "-"
        return (f"{x['flashinfer_ms']:.3f} ({x['flashinfer_rows_with_our_kept_tokens']} of {r['batch_size']} "
                f"rows ours)")

    def draws(x: dict) -> str:
        if x.get("raylm_sample_ms") is None:
            return "-"
        return f"{x['raylm_sample_ms']:.3f} / " + _fmt(x.get("flashinfer_sample_ms"), ".3f")

    return [Row((r["device"], x["setting"], r["batch_size"], r["vocab_size"]), x["setting"],
                [r["device"], x["setting"], f"{x['top_k'] or '-'} / {x['top_p']}", r["batch_size"], r["vocab_size"],
                 f"{x['raylm_ms']:.3f}", _fmt(x.get("raylm_sort_ms"), ".3f"), f"{x['peer_ms']:.2f}",
                 f"{x['speedup']:.1f}x",
                 "-" if x.get("floor_ms") is None else f"{x['floor_ms']:.3f} ({x['fraction_of_floor']:.2f})",
                 f"{x['rows_with_the_same_kept_tokens']} of {r['batch_size']}", fi(x), draws(x)])
            for x in r["rows"]]


def _host_step(r: dict) -> list[Row]:
    wires = {"none": "no (in process)", "whole": "yes (as the Ray path sends them)"}
    return [Row((r["device"], x["running"], x["wire"]), x["wire"],
                [r["model"], r["device"], x["running"], wires.get(x["wire"], x["wire"]),
                 f"{x['host_ms_per_step']:.2f}", f"{x['host_us_per_sequence']:.1f}"], r.get("note", ""))
            for x in r["rows"]]


def _spec_decode(r: dict) -> list[Row]:
    cost = r.get("round_cost_in_decode_steps")
    tpot = ("-" if r.get("raylm_tpot_ms") is None
            else f"{_ms(r['raylm_tpot_ms'])} ({_ms(r.get('baseline_tpot_ms'))})")
    mode = r.get("mode") or ("k=" + str(r["num_speculative_tokens"]))
    return [Row((r["model"], r["device"], r["method"], r["workload"], r["batch_size"], mode), "spec_decode",
                [r["model"], r["device"], r["method"] + (f" ({r['draft_model']})" if r.get("draft_model") else ""),
                 mode, r["batch_size"], r["workload"], f"{r['acceptance_rate']:.2f}",
                 _fmt(r.get("mean_acceptance_length"), ".2f"), _n(r["raylm_output_tok_per_s"], 1),
                 _n(r["baseline_output_tok_per_s"], 1), f"{r['speedup']:.2f}x", tpot,
                 "-" if cost is None else f"{cost:.2f}",
                 f"{r.get('requests_equal_to_baseline', '-')} of {r.get('requests', '-')}"], r.get("note", ""))]


def _startup(r: dict) -> list[Row]:
    marks = {(x["who"].split(" ")[0], x["mark"]): x["t_s"] for x in r["timeline"]}
    core = {k[1]: v for k, v in marks.items() if k[0].startswith("core")}
    phases = (r.get("core_phases_s") or [{}])[0] or {}
    engine = " / ".join(f"{phases[k]:.1f}" for k in ("load_s", "profile_s", "kv_cache_and_graphs_s") if k in phases)
    return [Row((r["model"], r["device"], r["num_groups"], r.get("note", "")), "startup",
                [r["model"], r["device"], r["num_groups"], f"{marks[('driver', 'serve_start')]:.1f}",
                 f"{core.get('process_start', 0):.1f}", f"{core.get('engine_built', 0):.1f}", engine or "-",
                 f"{marks[('driver', 'serve_run')]:.1f}", f"{r['startup_s']:.1f}"], r.get("note", ""))]


def _attention_points(r: dict) -> dict[tuple, dict]:
    """An attention sweep by point (op, batch, context, tokens): its floor, each backend's
    microseconds (None: refused) and the fastest (us, backend), None if all refused."""
    points: dict[tuple, dict] = {}
    for x in r["rows"]:
        key = (x["op"], x["batch_size"], x["context_len"], x["num_tokens"])
        points.setdefault(key, {"floor": x["floor_us"], "us": {}})["us"][x["backend"]] = x["us"]
    for p in points.values():
        p["best"] = min(((us, name) for name, us in p["us"].items() if us is not None), default=None)
    return points


def _attention_tiles(r: dict) -> list[Row]:
    """One row per kernel, model and shape of a tile sweep: the earlier kernel (baseline),
    the default, and the fastest variant, microseconds, beside the floor."""
    rows = []
    by_point: dict[tuple, list[dict]] = {}
    for x in r["rows"]:
        by_point.setdefault((x["op"], x["model"], x["shape"]), []).append(x)
    for (op, model, shape), xs in by_point.items():
        def us(variant):
            return next((x["us"] for x in xs if x["variant"] == variant and x["us"] is not None), None)
        timed = [x for x in xs if x["us"] is not None]
        if not timed:
            continue
        best = min(timed, key=lambda x: x["us"])
        name = best["variant"] if best["tiles"] is None else "tiles " + " / ".join(str(t) for t in best["tiles"])
        base, default = us("baseline"), us("default")
        rows.append(Row((op, model, shape, r["device"]), f"{op} {model} {shape}",
                        [op, model, r["device"], shape, _fmt(base, ".1f") if base else "-",
                         _fmt(default, ".1f") if default else "-", _ratio(base, default) if base and default else "-",
                         name, f"{best['us']:.1f}", f"{xs[0]['floor_us']:.1f}",
                         f"{xs[0]['floor_us'] / best['us']:.2f}"], r.get("label", "")))
    return rows


def _attention_gap_reason(backend: str, op: str, batch: int, ctx: int, block_size: int) -> str:
    """Why `backend` trails the fastest at a point, where its source or a measurement says
    (benchmarks/ATTENTION_INSTALL.md, RESULTS findings of 2026-12-05 and -06)."""
    if backend == "flash_attn" and op == "decode" and batch <= 16:
        return "no split-KV on SM90: one program per sequence and head leaves SMs idle"
    if backend == "flash_attn" and block_size != 128:
        return "pages read by TMA only at block size 128; gathered at this block size"
    if backend == "flashinfer" and op == "mixed":
        return "raylm runs a mixed step in its prefill wrapper, each decode row a one-token request; not profiled"
    if backend == "triton" and op in ("prefill", "mixed"):
        return ("no TMA or warp-specialized pipeline (FA3's and FA4's SM90 kernels have both); not its tiles: "
                "none of attention_tiles.py's 10 closes the gap (8k prefill 1,491 us at best on an H100)")
    if backend == "triton" and op == "decode" and batch == 1 and ctx >= 8192:
        return "at most 16 splits at batch 1 then: 128 programs on 132 SMs (32 since 2026-12-06)"
    return "cause not profiled"


def _attention_gaps(p: dict, op: str, batch: int, ctx: int, block_size: int) -> str:
    """The backends more than 5 % behind the fastest at a point, by how much and why."""
    if not p["best"]:
        return ""
    best_us, best_name = p["best"]
    out = []
    for name, us in sorted(p["us"].items()):
        if us is not None and us > 1.05 * best_us:
            why = _attention_gap_reason(name, op, batch, ctx, block_size)
            out.append(f"{name} {us / best_us:.2f}x {best_name} ({why})")
    return "; ".join(out)


def _attention(r: dict) -> list[Row]:
    """One row per point of the sweep, microseconds per backend side by side; the note names
    each backend more than 5 % behind the fastest, and why where known."""
    rows = []
    for (op, batch, ctx, tokens), p in _attention_points(r).items():
        what = (f"batch {batch}, context {ctx}" if op == "decode" else f"{tokens} tokens" if op == "prefill"
                else f"{tokens} tokens: a {tokens - batch + 1}-token chunk beside {batch - 1} decodes")
        if r["block_size"] != 16:  # the engine's default; another block size is named
            what += f" (block size {r['block_size']})"
        best = p["best"]
        rows.append(Row((r["model"], r["device"], r["block_size"], r["kv_cache_dtype"], op, batch, ctx, tokens),
                        f"{op}-{batch}-{ctx}-{tokens}",
                        [r["model"], r["device"], op, what,
                         {name: "refused" if us is None else _n(us, 1) for name, us in p["us"].items()},
                         _n(p["floor"], 1), best[1] if best else "-",
                         f"{p['floor'] / best[0]:.2f}" if best else "-"],
                        _attention_gaps(p, op, batch, ctx, r["block_size"])))
    return rows


def _ray_overhead(r: dict) -> list[Row]:
    return [Row((r["device"], name), name,
                [name.split("_", 1)[1].replace("_", " "), r["device"], r["config"]["batch"],
                 f"{v['median_ms']:.3f}", f"{v['p10_ms']:.3f}", f"{v['p90_ms']:.3f}"])
            for name, v in r["results"].items() if "median_ms" in v]


def _output_channel(r: dict) -> list[Row]:
    return [Row((r["device"], x["path"]), x["path"],
                [x["path"], r["device"], f"{r['batch_bytes']:,}", f"{r['rate_per_s']:g}",
                 x["sender_cpu_us_per_batch"], x["receiver_cpu_us_per_batch"], x["total_cpu_us_per_batch"]])
            for x in r["rows"]]


SECTIONS = [
    Section("Offline throughput",
            "Output tokens per second of the `LLM` API on random bf16 weights. The workload: token-id prompts "
            "and output lengths uniform in 100-1024 (seed 0), temperature 0.6, `ignore_eos`, "
            "`max_model_len` 4096. Roofline: the time the GPU needs for the run's bytes and FLOPs. Start-up: "
            "building `LLM(...)`, in seconds.",
            ("throughput",),
            ["Model", "Device", "TP x groups", "Requests", "raylm out tok/s", "Peer", "Peer out tok/s",
             "raylm / peer", "Of roofline", "Start-up s"], _throughput),
    Section("Serving over HTTP",
            "The Ray Serve application under streaming completions on random bf16 weights (the offline "
            "workload's prompts and lengths, streamed with usage). Latencies in ms; the peer's in parentheses. "
            "Start-up: process start to the first served request, in seconds.",
            ("serving",),
            ["Model", "Device", "TP x groups", "Requests", "Lengths", "raylm out tok/s", "Peer", "Peer out tok/s",
             "raylm / peer", "TTFT p50", "TPOT p50", "ITL p99", "Start-up s"], _serving),
    Section("Host scaling (no GPU)",
            "The whole serving path (ingress replicas serving HTTP, router, one engine core process per group, "
            "clients in their own processes) in front of a stand-in model that sleeps each step's device time "
            "(`benchmarks/host_scaling.py`). Linear: G times one group's tok/s. Latencies in ms. Host CPU: "
            "every thread of each role's processes over the load, per output token.",
            ("host_scaling",),
            ["Machine", "Stand-in step", "Groups", "Streams", "out tok/s", "Of linear", "TPOT p50", "ITL p99",
             "Cores in steps", "Host CPU us a token (ingress / core / router / clients)"], _host_scaling),
    Section("Attention kernels per operation",
            "One layer's paged attention (`benchmarks/attention.py`: Llama-3.1-8B's heads, block size 16, bf16 "
            "cache, replayed from CUDA graphs), microseconds per backend: Triton (ours), FlashInfer, FlashAttention-4 "
            "(`flash_attn`). Floor: the KV bytes over the HBM bandwidth or the FLOPs over the bf16 peak, whichever "
            "is larger (datasheet figures of the GPU). `attention_backend=\"auto\"` picks from this table "
            "(raylm/workers/attention_backends.py, AUTO_RULES). The note names each backend more than 5 % behind "
            "the fastest at that shape, and why where the source or a measurement says. Triton's figures here "
            "predate its kernels of 2026-12-06 (the next table times those against these).",
            ("attention",),
            ["Model", "Device", "Op", "Shape", "{} us", "Floor us", "Fastest", "Floor / fastest"], _attention),
    Section("Attention kernel tiles",
            "raylm's Triton prefill / mixed-step kernel (tiles: BLOCK_M / BLOCK_N / warps / stages) and decode "
            "kernel (tiles: BLOCK_N / warps / stages, then the split rule's waves / max splits where set) on one layer's paged cache, replayed from CUDA graphs "
            "(`benchmarks/attention_tiles.py`; block size 16, bf16), microseconds: the kernel before the change "
            "(baseline), the default at the time of the run, its speed-up over the baseline, and the fastest "
            "variant. Floor as above.",
            ("attention_tiles",),
            ["Kernel", "Model", "Device", "Shape", "Baseline us", "Default us", "Default vs baseline",
             "Fastest", "Fastest us", "Floor us", "Floor / fastest"], _attention_tiles),
    Section("Speculative decoding",
            "`benchmarks/spec_decode.py`: speculation beside the same engine without it, in one run, greedy. "
            "Acceptance: accepted over proposed tokens; mean acceptance length: tokens a verified row emits. "
            "Round cost (draft models): one propose-and-verify step in plain decode steps. Same output: requests "
            "whose tokens equal plain decoding's. TPOT in ms, without speculation in parentheses.",
            ("spec_decode",),
            ["Model", "Device", "Method", "k", "Batch", "Workload", "Acceptance", "Mean acceptance length",
             "out tok/s", "Without", "Speed-up", "TPOT", "Round cost", "Same output"], _spec_decode),
    Section("Start-up of the serving path",
            "Seconds from the process's start (`benchmarks/startup.py`, random weights): Serve started, the "
            "engine core's process started and its engine built (of which load / memory profile / KV cache and "
            "graphs), `serve.run` returned, the first request served.",
            ("startup",),
            ["Model", "Device", "Groups", "Serve up", "Core process start", "Core engine built",
             "Load / profile / KV and graphs", "App up", "First request"], _startup),
    Section("Recovery from a killed group",
            "Closed-loop streaming on the Serve application while group 0's engine core process is SIGKILLed "
            "mid-run (`benchmarks/fault.py`): its requests move to another group by recompute and the router "
            "restarts it. Output tok/s in 1 s buckets: the mean from 2 s to the kill, the lowest bucket after it "
            "(as a fraction of that mean), the recovery (seconds from the kill until every 3 s average stays "
            ">= 90 % of that mean) and the restart (the group not serving -> serving per /health).",
            ("fault",),
            ["Model", "Device", "Stand-in step", "Groups", "Streams", "Pre-kill out tok/s", "Dip out tok/s", "Recovery s",
             "Restart s", "Requests completed", "Failed", "Re-dispatched"], _fault),
    Section("The front door under load",
            "How fast `/health` answers (ms) on the whole serving path in front of the stand-in model while "
            "bodies over the 16 MiB `max_request_body_bytes` are refused with 413 (sent with Content-Length, "
            "chunked fast, chunked slowly) and the streams run (`benchmarks/front_door.py`); the target is "
            "p99 under 100 ms. Probes every 20 ms on one connection, every fifth of them `/version`, which "
            "asks nothing of the router.",
            ("front_door",),
            ["Machine", "Stand-in step", "Streams", "Tokens each", "413s", "/health p50 / p99 / max",
             "While bodies sent", "/version (no router hop)", "/health before the streams", "Probes",
             "Streams completed / failed", "Responses >= 500"],
            _front_door),
    Section("Batch-1 latency",
            "One request at a time: time to first token and time per output token (ms) for a prompt of the "
            "given length. TPOT floor: the time to read the weights and KV cache once at the measured bandwidth.",
            ("latency",),
            ["Model", "Device", "TP", "Prompt tokens", "TTFT", "TPOT", "Peer TTFT / TPOT", "TPOT floor"], _latency),
    Section("Quantized models end to end",
            "Llama-3.1-8B-shaped random weights, output tok/s. bf16 ran in the same call. Workloads: batch1 = one "
            "128-token prompt, 512 output tokens; random = the offline workload above; 1000x1000 (512 requests) "
            "and 128x128 (2,048 requests) = TensorRT-LLM's, whose published fp8 figures on one H100 stand beside "
            "ours. W4A16 checkpoints run the repacked w4r layout on the GPU.",
            ("quant_throughput",),
            ["Model", "Device", "Weights", "KV cache", "Workload", "max_num_seqs", "out tok/s", "bf16 out tok/s",
             "vs bf16", "TensorRT-LLM fp8, H100 (published)", "Preemptions"], _quant_throughput),
    Section("Quantized GEMMs",
            "One Llama-3.1-8B layer's four GEMMs (qkv, o, gate_up, down) at M rows, speed against bf16 cuBLAS "
            "in the same call, activation quantization included. w4a16-w4r: the 4-bit layout every GPTQ, AWQ and "
            "compressed-tensors checkpoint is repacked into at load; w4a16-gptq-no-gidx and w4a16-awq: kernels "
            "on the checkpoints' own layouts; w8a8-int8 and fp8: per-channel weights, per-token activations; "
            "fp8-block: HF's 128x128 block-scaled fp8 on our Triton kernel, fp8-block-cublas: the same through "
            "cuBLAS (used from 128 rows).",
            ("quant_gemm",),
            ["Device", "Format", "M={}"], _quant_gemm),
    Section("Tensor-parallel agreement",
            "Greedy decoding on random bf16 weights at TP=2 and 4 against TP=1 (NCCL, CUDA graphs): prompts "
            "whose first tokens all agree, the largest log-probability difference before the first divergence "
            "(nats), and how many divergences fall where TP=1's top two tokens are within 0.1 nats.",
            ("tp_correctness",),
            ["Model", "Device", "Compared", "Prompts agreeing", "Max logprob diff", "Divergences at near-ties",
             "Start-up s", "Shutdown s"], _tp_correctness),
    Section("bf16 agreement with transformers",
            "raylm's bf16 greedy tokens against HF transformers' bf16 and against float32 on the CPU, on the "
            "same random weights; HF's own bf16 against float32 is the control.",
            ("agreement",),
            ["Model", "Device", "Layers", "raylm vs HF bf16", "raylm vs CPU float32",
             "HF bf16 vs CPU float32 (control)", "Median top-2 gap (nats)"], _agreement),
    Section("Decode step profile",
            "Where one decode step's time goes (ms) at a full batch, with asynchronous scheduling.",
            ("step_profile",),
            ["Model", "Device", "Batch", "Mean context", "Step loop", "GPU forward (graph)", "Bandwidth floor",
             "LM head / sampling (GPU)", "Host: schedule / outputs / inputs"], _step_profile),
    Section("Structured outputs",
            "Requests each with its own JSON schema against the same requests unconstrained, in one run on "
            "random weights, the embedded SmolLM2 tokenizer; backend: the grammar library "
            "(`--backend`), and how the run differs (`--precompiled`: every schema compiled before the "
            "timed run, so it times the step loop alone; `--no-pipeline`: each grammar step's sampling "
            "queued before the next step is planned). A stand-in executor device sleeps each step's GPU "
            "time and draws grammar rows' tokens from their bitmasks: the host path alone. Step times and "
            "compile times in ms; the step p50 is over all steps, or (full batch) over those that ran at "
            "least 3/4 of the requests with no compile pending. Compile probe (`--probe`, since 2026-12-06): "
            "requests with schemas never compiled arrive beside a steady batch of decoding requests (its step "
            "p99 in brackets); until each has its first token: the window, structured / the same requests "
            "unconstrained, and the window's step p99, structured / unconstrained.",
            ("structured",),
            ["Model", "Device", "Backend", "Requests", "Structured out tok/s", "Unconstrained out tok/s", "Ratio",
             "Step p50 structured / unconstrained", "Compile p50 / p99", "Step p99 while compiling",
             "Compile probe", "Stopped and valid"], _structured),
    Section("Sampling filters",
            "Temperature 0.6, then top-k / top-p on one step's logits (`benchmarks/sampling.py`), raylm's "
            "sampler beside HF transformers' logits warpers on the same logits in the same run, at the "
            "settings of real generation configs. ms per call; floor: the logits read and the mask written "
            "once at the measured copy bandwidth (GPU only), with the fraction of it reached. Same kept "
            "tokens: rows where both keep one set (they differ only by rounding at the top-p boundary). "
            "Sorting: raylm's filter before its sort-free kernel (a sort of the vocabulary where a row's k is "
            "large or absent). FlashInfer: its sort-free renorm kernels' mask on the same logits (where "
            "installed). Draw: a whole sampling step, raylm's filter and exponential race / FlashInfer's "
            "top_k_top_p_sampling_from_logits.",
            ("sampling",),
            ["Device", "Setting", "top_k / top_p", "Batch", "Vocabulary", "raylm ms", "raylm sorting ms",
             "HF warpers ms", "Speed-up", "Floor ms (fraction)", "Same kept tokens", "FlashInfer ms",
             "Draw ms raylm / FlashInfer"], _sampling),
    Section("GPU time of a serving step",
            "Kernel time per step (ms, `torch.profiler`) in the steady state of the serving benchmark's closed "
            "loop, run offline: 256 in flight (or as the row says), prompts and outputs of 100-1024 tokens; "
            "kernel launches per step where recorded.",
            ("gpu_step_breakdown",),
            ["Model", "Device", "Attention", "In flight", "Steps profiled", "GPU kernels", "GEMMs", "Launches",
             "Top kernels (ms)"],
            _gpu_step_breakdown),
    Section("Host work per decode step",
            "What the engine process does per decode step (schedule, record, detokenize, build outputs) with "
            "a stand-in executor that returns tokens at once, so no GPU time is included.",
            ("host_step",),
            ["Model", "Device", "Sequences", "Plan and result through msgpack", "Host ms per step",
             "us per sequence"], _host_step),
    Section("Ray overhead",
            "Median one-token decode step (ms) of a tiny model on the CPU, in process and through Ray.",
            ("ray_overhead",),
            ["Path", "Device", "Batch", "Median ms", "p10 ms", "p90 ms"], _ray_overhead),
    Section("Engine core to ingress: one step's outputs",
            "CPU time (us, every thread, above idle) to hand one batch of outputs from an engine core's "
            "actor to an ingress replica's, by the way it travels; a core sends one batch a step to every "
            "ingress replica.",
            ("output_channel",),
            ["Path", "Device", "Batch bytes", "Batches a second", "Sender us", "Receiver us", "Total us"],
            _output_channel),
    Section("Kernel tile sweeps: int8 and block-scaled fp8",
            "Best Triton tile per M for one Llama-3.1-8B layer's four GEMMs (us), without and with the "
            "activation quantization.",
            ("int8_tune", "int8_tune-fp8-block"),
            ["Device", "Format", "M", "Best tile", "Best us", "bf16 us", "Baseline us", "Act quant us",
             "With act quant vs bf16"], _int8_tune),
    Section("Kernel tile sweeps: W4A16",
            "Best fused tile per M for one Llama-3.1-8B layer's four GEMMs (us) against dequantizing the whole "
            "weight and calling cuBLAS, and bf16 cuBLAS.",
            ("w4a16_tune",),
            ["Device", "Layout", "M", "Best tile", "Fused us", "Dequantize + cuBLAS us", "bf16 us",
             "Fused vs bf16"], _w4a16_tune),
]


def _sort_key(key: tuple) -> tuple:
    return tuple((0, x, "") if isinstance(x, (int, float)) and not isinstance(x, bool)
                 else (1, 0, "" if x is None else str(x)) for x in key)


def choose(records: list[dict], section: Section) -> list[tuple[dict, Row]]:
    """The newest record's row for each configuration, in configuration order."""
    best: dict[tuple, tuple[dict, Row, list[str]]] = {}
    for r in records:
        if r["benchmark"] not in section.benchmarks or _left_out(r):
            continue
        skip = r.get("superseded_rows") or {}
        for row in section.rows(r):
            if row.id and row.id in skip:
                continue
            cur = best.get(row.key)
            if cur is None or r["date"] > cur[0]["date"]:
                best[row.key] = (r, row, [])
            elif r["date"] == cur[0]["date"]:
                cur[2].append(r["_path"])
    ties = [f"{section.title} {k}: {v[0]['_path']} and {', '.join(v[2])} ({v[0]['date']})"
            for k, v in best.items() if v[2]]
    if ties:
        raise ValueError("two records of one date for one configuration; give the older one "
                         "\"superseded_by\" (or \"superseded_rows\"):\n  " + "\n  ".join(ties))
    return [(r, row) for k, (r, row, _) in sorted(best.items(), key=lambda kv: _sort_key(kv[0]))]


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_table(section: Section, chosen: list[tuple[dict, Row]]) -> str:
    spread = sorted({k for _, row in chosen for c in row.cells if isinstance(c, dict) for k in c})
    header = []
    for c in section.columns:
        header += [c.format(k) for k in spread] if "{}" in c else [c]
    notes = [_notes(row.note, r.get("label")) for r, row in chosen]
    header += (["Note"] if any(notes) else []) + ["Date", "Command", "Result file"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (r, row), note in zip(chosen, notes):
        cells = []
        for c in row.cells:
            cells += [c.get(k, "-") for k in spread] if isinstance(c, dict) else [c]
        cells += ([note or "-"] if any(notes) else []) + [r["date"], f"`{r['command']}`",
                                                          f"[{r['_path']}](results/{r['_path']})"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def current_state(records: list[dict]) -> str:
    """The generated block, markers included."""
    parts = [BEGIN, "<!-- Generated by `python benchmarks/record.py --write` from benchmarks/results/**/*.json: "
                    "edit those, not this block. -->"]
    for section in SECTIONS:
        chosen = choose(records, section)
        if chosen:
            parts += [f"### {section.title}", section.intro, render_table(section, chosen)]
    parts.append(END)
    return "\n\n".join(parts)


def replace_block(text: str, block: str) -> str:
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[:i] + block + text[j + len(END):]


def current_block(text: str) -> str:
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[i:j + len(END)]


def plot(records: list[dict], path: str) -> None:
    """raylm beside its peer for the current offline and HTTP rows that have one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(r, kind) for kind, section in (("offline", SECTIONS[0]), ("HTTP", SECTIONS[1]))
             for r, _ in choose(records, section) if r.get("peer_output_tok_per_s")]
    if not pairs:
        return
    fig, ax = plt.subplots(figsize=(1.6 * len(pairs) + 2, 4))
    xs = range(len(pairs))
    ax.bar([x - 0.2 for x in xs], [r["raylm_output_tok_per_s"] for r, _ in pairs], 0.4, label="raylm")
    ax.bar([x + 0.2 for x in xs], [r["peer_output_tok_per_s"] for r, _ in pairs], 0.4,
           label=" / ".join(sorted({_peer_name(r["peer"]) for r, _ in pairs})))
    ax.set_xticks(list(xs), [f"{r['model']}\n{kind}\n{r['device']}" for r, kind in pairs], fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title("Output throughput, " + ", ".join(sorted({r["date"] for r, _ in pairs})))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="print one summary line per record of these files")
    p.add_argument("--write", action="store_true", help="regenerate the block in RESULTS.md")
    p.add_argument("--check", action="store_true", help="exit 1 when the block in RESULTS.md is stale")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--md", default=RESULTS_MD)
    args = p.parse_args(argv)
    if args.files:
        for path in args.files:
            with open(path) as f:
                data = json.load(f)
            for r in data if isinstance(data, list) else [data]:
                print(row(r))
        return 0
    records = load_records(args.results_dir)
    block = current_state(records)
    if args.plot:
        plot(records, args.plot)
    if args.check or args.write:
        with open(args.md) as f:
            text = f.read()
        if args.check:
            if current_block(text) != block:
                print(f"{args.md}: the current-state block is stale; run python benchmarks/record.py --write",
                      file=sys.stderr)
                return 1
            return 0
        with open(args.md, "w") as f:
            f.write(replace_block(text, block))
        return 0
    if not args.plot:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
