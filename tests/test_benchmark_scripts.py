"""The GPU correctness scripts run on the CPU too, where every path is float32 and must
agree exactly: benchmarks/agreement.py (raylm against transformers on the same weights)
and benchmarks/tp_correctness.py (TP=2 against TP=1 on dummy weights). Each writes the
result file that benchmarks/record.py turns into a RESULTS.md row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _script(name: str, args: list[str], out_dir) -> str:
    env = dict(os.environ, OUT=str(out_dir), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


def test_agreement_script_on_cpu_is_exact(llama_dir, tmp_path):
    import record

    _script("agreement.py", ["--model", llama_dir, "--device", "cpu", "--num-prompts", "3",
                             "--max-tokens", "6"], tmp_path)
    r = json.load(open(tmp_path / "agreement-llama.json"))
    assert r["median_top2_gap_nats"] > 0
    for name in ("raylm_vs_hf", "raylm_vs_cpu_float32", "hf_vs_cpu_float32"):
        c = r[name]
        assert c["prompts_agreeing_on_first_tokens"] == 3 and c["first_divergence"] == [6, 6, 6]
        assert c["max_abs_logprob_diff_before_divergence"] < 1e-4
    assert r["benchmark"] == "agreement" and r["device"] == "cpu"
    assert "vs HF: 3/3 prompts agree" in record.row(r)
    assert "HF bf16 itself vs CPU float32: 3/3" in record.row(r)


def test_tp_correctness_script_on_cpu(llama_dir, tmp_path):
    import record

    out = _script("tp_correctness.py", ["--model", llama_dir, "--tp-sizes", "1,2", "--num-prompts", "3",
                                        "--max-tokens", "5", "--first", "5", "--max-model-len", "256",
                                        "--max-prompt-len", "60"], tmp_path)
    assert "TP=2 vs TP=1: 3/3 prompts agree" in out
    r = json.load(open(tmp_path / "tp_correctness-llama.json"))
    c = r["vs_reference"]["2"]
    assert c["max_abs_logprob_diff_before_divergence"] < 0.05  # bfloat16 on both sides
    assert "TP=2 vs TP=1: 3/3 prompts agree" in record.row(r)


def test_host_step_measures_both_paths(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_step.py"), "--batch", "8",
                        "--steps", "5", "--vocab-size", "500"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.load(open(tmp_path / "host_step.json"))
    assert r["benchmark"] == "host_step" and [x["wire"] for x in r["rows"]] == ["none", "whole"]
    assert all(x["running"] == 8 and x["host_ms_per_step"] > 0 for x in r["rows"])
