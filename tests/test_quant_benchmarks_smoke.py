"""The quantization benchmarks' --smoke modes (CPU: tiny shapes under Triton's interpreter,
a tiny random model) run to the end and write result files with the fields
benchmarks/record.py and a reader of RESULTS.md rely on. All six run at once in
subprocesses: about 60 s on a 2-core machine (each alone takes 5-22 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_FIELDS = {"benchmark", "model", "device", "date", "command", "torch"}
# Only a guard against a hang, over ten times the 63 s the six took together on the 2-core
# machine with no other test running (others' load about 2.5): 180 s failed on a loaded one.
DEADLINE_S = 900


def _run_both(out_dir) -> dict:
    env = dict(os.environ, OUT=str(out_dir), CUDA_VISIBLE_DEVICES="")
    scripts = {"quant_gemm": "quant_gemm-smoke", "quant_throughput": "quant_throughput-smoke",
               "w4a16_tune": "w4a16_tune-smoke", "w4a16_tune --stages w4r": "w4a16_tune-w4r-smoke",
               "int8_tune": "int8_tune-smoke",
               "int8_tune --format fp8-block": "int8_tune-fp8-block-smoke"}
    procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", f"{name.split()[0]}.py"),
                                     "--smoke", *name.split()[1:]],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in scripts}
    results = {}
    deadline = time.monotonic() + DEADLINE_S
    for name, p in procs.items():
        try:
            log, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"{name} --smoke still running after {DEADLINE_S} s")
        assert p.returncode == 0, log[-4000:]
        results[name] = json.load(open(os.path.join(out_dir, f"{scripts[name]}.json")))
    return results


def test_smoke_modes_write_complete_results(tmp_path):
    results = _run_both(tmp_path)

    g = results["quant_gemm"]
    assert BASE_FIELDS <= g.keys() and g["benchmark"] == "quant_gemm" and g["device"] == "cpu"
    assert {"measured_bandwidth_Bps", "measured_peak_flops", "rows", "summary", "shapes", "m"} <= g.keys()
    formats = {"bf16", "w4a16-gptq", "w4a16-gptq-no-gidx", "w4a16-awq", "w4a16-w4r", "w8a8-int8", "fp8", "fp8-block",
               "fp8-block-cublas"}
    assert set(g["formats"]) == formats
    seen = {(r["format"], r["shape"], r["m"], r["act_quant_included"]) for r in g["rows"]}
    for s in g["shapes"]:
        for m in g["m"]:
            for f in formats:
                assert (f, s["name"], m, False) in seen
            for f in ("w8a8-int8", "fp8", "fp8-block", "fp8-block-cublas"):
                assert (f, s["name"], m, True) in seen
    for r in g["rows"]:
        assert r["time_us"] > 0 and r["flops"] == 2 * r["m"] * r["k"] * r["n"] and r["bytes"] > 0
        assert {"speedup_vs_bf16", "fraction_of_roofline", "bound", "memory_floor_us", "compute_floor_us"} <= r.keys()
        if r["format"] == "bf16":
            assert r["speedup_vs_bf16"] == 1.0
        if r["format"].startswith("w4a16"):  # packed 4-bit weights: a quarter of bf16's bytes, plus scales
            dense = 2 * r["k"] * r["n"]
            assert dense / 4 < r["bytes"] - 2 * r["m"] * (r["k"] + r["n"]) < dense / 2

    t = results["quant_throughput"]
    assert BASE_FIELDS <= t.keys() and t["benchmark"] == "quant_throughput"
    assert t["published"]["trtllm_fp8_h100_output_tok_per_s"]["1000x1000"] == 15220
    assert t["published"]["trtllm_fp8_h100_output_tok_per_s"]["128x128"] == 28312
    assert set(t["workloads"]) == {"random", "1000x1000", "128x128", "batch1"}
    runs = {(r["format"], r["kv_cache_dtype"]): r for r in t["runs"]}
    for fmt in ("bf16", "fp8", "int8", "w4a16-gptq"):
        r = runs[(fmt, "auto")]
        assert r["error"] is None, r["error"]
        for name, w in t["workloads"].items():
            got = r["workloads"][name]
            assert got["output_tokens"] == w["output_tokens"] and got["output_tok_per_s"] > 0
            assert {"speedup_vs_bf16", "fraction_of_roofline", "ratio_vs_trtllm_fp8", "timing"} <= got.keys()
    # The fp8-KV runs exist either way: measured, or skipped because EngineArgs lacks the field.
    for fmt in ("bf16", "fp8", "int8", "w4a16-gptq"):
        r = runs[(fmt, "fp8")]
        assert r.get("skipped") or r["workloads"], r
        assert bool(r.get("skipped")) != t["kv_cache_dtype_supported"]
    fixed = [c for c in t["comparison"] if c["workload"] in ("1000x1000", "128x128")]
    assert fixed and all(c["trtllm_fp8_h100_output_tok_per_s"] for c in fixed)

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import record

    u = results["w4a16_tune"]
    assert BASE_FIELDS <= u.keys() and u["benchmark"] == "w4a16_tune"
    for layout in ("gptq", "awq"):
        best = u["summary"][layout]
        assert best["m1_layer_us"] > 0 and {"block_n", "block_k", "split_k", "expand"} <= best["best_m1_config"].keys()
        assert all(v["fused_us"] > 0 and v["dequant_us"] > 0 for v in best["batch"].values())
        assert set(best["large"]) == {"40"} and best["large"]["40"]["fused_us"] > 0
    assert {r["stage"] for r in u["rows"]} == {"bf16", "grid", "refine", "large", "batch"}
    assert "M=40 best fused" in record.row(u)
    w = results["w4a16_tune --stages w4r"]
    assert set(w["summary"]["w4r"]) == {"17", "40"} and "gptq" not in w["summary"]
    for v in w["summary"]["w4r"].values():
        assert v["best_us"] > 0 and v["chosen_us"] > 0 and v["dequant_us"] > 0 and v["bf16_us"] > 0
    assert {r["path"] for r in w["rows"] if r["stage"] == "w4r"} == {"fused", "chosen", "dequant+cublas"}
    assert "w4r: M=17 best" in record.row(w)

    v = results["int8_tune"]
    assert BASE_FIELDS <= v.keys() and v["benchmark"] == "int8_tune"
    assert set(v["summary"]) == {"1", "17"}
    for m, best in v["summary"].items():
        assert best["best_us"] > 0 and best["bf16_us"] > 0 and best["act_quant_us"] > 0
        assert {"block_m", "block_n", "block_k", "split_k", "group_m"} <= best["best_config"].keys()
    assert {r["path"] for r in v["rows"]} == {"bf16", "act_quant", "current", "triton"}
    assert "M=17 best" in record.row(v)
    b = results["int8_tune --format fp8-block"]
    assert b["benchmark"] == "int8_tune-fp8-block" and b["format"] == "fp8-block"
    assert set(b["summary"]) == {"1", "17"} and {r["path"] for r in b["rows"]} == {"bf16", "act_quant", "current", "triton"}
    assert all(r["config"]["block_k"] in (16, 32) for r in b["rows"] if r["path"] == "triton")
