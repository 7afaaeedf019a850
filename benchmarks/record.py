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
    if r["benchmark"] == "latency":
        parts = [f"{x['prompt_len']}: TTFT {x['raylm_ttft_ms']:.1f} ms, TPOT {x['raylm_tpot_ms']:.2f} ms"
                 + (f" (HF {x['peer_ttft_ms']:.1f} / {x['peer_tpot_ms']:.2f})" if "peer_tpot_ms" in x else "")
                 for x in r["rows"]]
        numbers = ("; ".join(parts) + f"; floor TPOT {r['bandwidth_floor_tpot_ms']:.2f} ms, "
                   f"{r['fraction_of_roofline']:.2f} of it at 128")
    else:
        numbers = (f"raylm {_fmt(r['raylm_output_tok_per_s'])} out tok/s; HF {_fmt(r.get('peer_output_tok_per_s'))}"
                   f" ({_fmt(r.get('ratio_vs_peer'), '.1f')}x); roofline {_fmt(r['roofline_output_tok_per_s'])}"
                   f" ({r['fraction_of_roofline']:.2f}); startup {r['raylm_startup_s']:.0f} s")
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
