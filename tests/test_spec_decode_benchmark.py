"""benchmarks/spec_decode.py in its --smoke mode (CPU, a tiny random llama): the three
workloads, batch 1 at fixed k and a batch with adaptive k, each beside plain decoding;
the records carry the fields the GPU run reports, and greedy outputs equal the
baseline's (float32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
FIELDS = ("benchmark", "model", "device", "date", "method", "num_speculative_tokens", "batch_size",
          "workload", "acceptance_rate", "raylm_output_tok_per_s", "baseline_output_tok_per_s",
          "baseline_tpot_ms", "speedup", "command")


def test_spec_decode_benchmark_smoke_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "spec_decode.py"), "--smoke"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    records = json.load(open(tmp_path / "spec_decode-tiny-llama-smoke.json"))
    assert [(r["workload"], r["batch_size"]) for r in records] == [("repeat", 1), ("repeat", 4),
                                                                    ("copy", 1), ("copy", 4),
                                                                    ("cycle", 1), ("cycle", 4),
                                                                    ("lookup", 1), ("lookup", 4)]
    # cycle: each prompt is P (16 tokens) and 64 tokens of the plain greedy trajectory.
    assert [r["prompt_len"] for r in records] == [16, 16, 56, 56, 80, 80, 16, 16]
    # lookup: prompts picked by a replay of the proposer over the plain continuations.
    assert all(0 < r["predicted_acceptance_rate"] <= 1 for r in records[-2:])
    for r in records[1::2]:  # the batch: a warm-up pass, then the best of two runs of each engine
        assert len(r["raylm_runs_output_tok_per_s"]) == len(r["baseline_runs_output_tok_per_s"]) == 2
        assert r["raylm_output_tok_per_s"] == max(r["raylm_runs_output_tok_per_s"])
    for r in records:
        assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
        assert r["benchmark"] == "spec_decode" and r["method"] == "ngram" and r["device"] == "cpu"
        assert isinstance(r["batch_size"], int) and "--smoke" in r["command"]
        assert r["raylm_output_tok_per_s"] > 0 and r["baseline_output_tok_per_s"] > 0 and r["speedup"] > 0
        assert 0 <= r["acceptance_rate"] <= 1
        assert r["requests_equal_to_baseline"] == r["requests"]
    assert records[0]["baseline_tpot_ms"] > 0 and records[0]["num_speculative_tokens"] == 4
    assert records[1]["adaptive_num_speculative_tokens"] is True
    assert any(r["num_accepted_tokens"] > 0 for r in records)


def test_spec_decode_benchmark_draft_model_smoke_on_cpu(tmp_path):
    """--method draft_model: one record per batch size with the round's cost in plain
    decode steps, a 1-layer draft beside the 2-layer target (random weights)."""
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "spec_decode.py"), "--smoke",
                        "--method", "draft_model"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    records = json.load(open(tmp_path / "spec_decode-draft-tiny-llama-smoke.json"))
    assert [r["batch_size"] for r in records] == [1, 4]
    for r in records:
        assert r["method"] == "draft_model" and r["draft_model"] == "tiny-llama-1-layer"
        assert r["round_cost_in_decode_steps"] > 0 and r["baseline_step_ms"] > 0
        assert r["num_draft_tokens"] > 0 and 0 <= r["acceptance_rate"] <= 1
        assert r["requests_equal_to_baseline"] == r["requests"]


def test_spec_decode_benchmark_controlled_draft_workload_smoke_on_cpu(tmp_path):
    """--draft-workload controlled: the target silences its layers past the draft's, the
    draft is its first layer with a noisy LM head. Without noise the draft proposes the
    target's own tokens (float32: every one accepted); with noise acceptance falls; the
    outputs equal plain decoding's either way (speculation is exact)."""
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "spec_decode.py"), "--smoke",
                        "--method", "draft_model", "--draft-workload", "controlled", "--draft-noise", "0,1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    records = json.load(open(tmp_path / "spec_decode-draft-tiny-llama-controlled-smoke.json"))
    assert [(r["draft_noise"], r["batch_size"]) for r in records] == [(0, 1), (0, 4), (1, 1), (1, 4)]
    for r in records:
        assert r["workload"] == "controlled" and r["method"] == "draft_model" and r["num_draft_tokens"] > 0
        assert r["requests_equal_to_baseline"] == r["requests"] and r["speedup"] > 0
        assert r["baseline_tpot_ms"] > 0
    exact = [r["acceptance_rate"] for r in records if r["draft_noise"] == 0]
    noisy = [r["acceptance_rate"] for r in records if r["draft_noise"] == 1]
    assert min(exact) == 1.0 and max(noisy) < 0.5, (exact, noisy)


def test_spec_decode_benchmark_edit_workload_on_the_real_smollm2(tmp_path):
    """--model smollm2-135m-instruct (the embedded model, float32 on the CPU): chat prompts
    asking it to repeat a text, which prompt lookup predicts; outputs equal plain decoding."""
    import record

    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "spec_decode.py"), "--model",
                        "smollm2-135m-instruct", "--workloads", "edit", "--batch-size", "1",
                        "--batch1-requests", "1", "--output-len", "24", "--max-model-len", "512"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    records = json.load(open(tmp_path / "spec_decode-smollm2-135m-instruct-cpu.json"))
    assert [(r["workload"], r["batch_size"]) for r in records] == [("edit", 1)]  # batch 1 only
    for r in records:
        assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
        assert r["ignore_eos"] is False and r["requests_equal_to_baseline"] == r["requests"]
        assert r["acceptance_rate"] > 0.5, r  # it copies the text it was given
        (row,) = record._spec_decode(r)
        assert row.cells[6] == f"{r['acceptance_rate']:.2f}"
    assert "acceptance" in record.row(records[0])


def test_replayed_acceptance_counts_what_the_proposer_would_accept():
    """The lookup workload's replay: rounds of up to k proposals from the tokens so far,
    accepted while they match the known continuation, then one more token."""
    from spec_decode import replayed_acceptance

    prompt = [5, 6, 7, 8, 5, 6]
    # 7 8 5 6 follows "5 6" earlier: a round proposes [7, 8, 5, 6] (k 4) and accepts all four
    # (4 proposed), emits 7 (the fifth token); then [8, 5, 6, 7]... all as in the cycle.
    acc, prop = replayed_acceptance(prompt, [7, 8, 5, 6, 7, 8, 5, 6, 7, 8], k=4)
    assert (acc, prop) == (8, 8)
    # A continuation that never repeats: every proposal is rejected at its first token.
    acc, prop = replayed_acceptance(prompt, [100, 101, 102, 103], k=4)
    assert acc == 0 and prop > 0
