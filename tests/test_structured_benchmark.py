"""benchmarks/structured.py in its `--device cpu` smoke mode: a tiny random llama with the
embedded SmolLM2 tokenizer, a few requests each with its own JSON schema, against the same
requests unconstrained; the result file carries every number the GPU run reports."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_schemas_are_distinct_bounded_and_valid():
    import jsonschema

    sys.path.insert(0, ROOT)
    from benchmarks.structured_schemas import make_schemas

    schemas = make_schemas(64, random.Random(0))
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == 64
    for s in schemas:
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["additionalProperties"] is False


def test_structured_benchmark_smoke_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "structured.py"), "--device", "cpu",
                        "--num-requests", "4", "--max-tokens", "160", "--probe", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.load(open(tmp_path / "structured_cpu-smoke.json"))
    assert r["benchmark"] == "structured" and r["device"] == "cpu" and r["num_requests"] == 4
    assert r["num_compiles"] == 4 and 0 < r["compile_ms_p50"] <= r["compile_ms_p99"]
    # The unconstrained run gives each request its structured output's length.
    assert r["unconstrained_output_tokens"] == r["structured_output_tokens"] <= 4 * 160
    assert r["structured_output_tok_per_s"] > 0 and r["unconstrained_output_tok_per_s"] > 0
    assert r["ratio_structured_vs_unconstrained"] > 0
    assert r["stopped_valid"] == r["stopped"] >= 2
    assert r["structured_step_ms_p99"] > 0
    # Where the host's step goes, for both runs: the grammar work is the structured run's.
    st, un = r["structured_step_timing"], r["unconstrained_step_timing"]
    assert st["steps"] > 0 and un["steps"] > 0
    assert st["grammar_ms_per_step"] > 0 and un["grammar_ms_per_step"] == 0
    assert r["structured_s"] > 0 and r["unconstrained_s"] > 0 and r["pipelined"] and not r["precompiled"]
    assert r["compile_probe"] == {}  # --probe 0


def test_structured_benchmark_behind_the_stand_in_executor(tmp_path):
    """--standin-step-ms: no model, a stand-in executor sleeps each step's device time and
    draws each grammar row's token from its bitmask (the host path alone, as on a GPU's
    host: asynchronous scheduling, deferred sampling, pipelined grammar steps)."""
    from transformers import LlamaConfig

    cfg = tmp_path / "cfg"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=50000, max_position_embeddings=2048, bos_token_id=1,
                eos_token_id=2, architectures=["LlamaForCausalLM"]).save_pretrained(cfg)
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "structured.py"), "--model", str(cfg),
                        "--standin-step-ms", "1", "--standin-token-us", "5", "--num-requests", "8",
                        "--max-tokens", "96", "--precompiled", "--trace"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    name = [f for f in os.listdir(tmp_path) if f.startswith("structured_")]
    assert len(name) == 1 and name[0].endswith("-standin-precompiled-n8.json"), name
    r = json.load(open(tmp_path / name[0]))
    assert r["device"].startswith("stand-in executor (1.0 ms + 5.0 us per token a step)")
    assert r["num_requests"] == 8 and r["precompiled"] and r["pipelined"]
    assert r["stopped"] >= 4 and r["stopped_valid"] == r["stopped"], r["invalid_examples"]
    assert r["unconstrained_output_tokens"] == r["structured_output_tokens"] > 0
    st = r["structured_step_timing"]
    assert st["grammar_ms_per_step"] > 0 and st["device_wait_ms_per_step"] > 0
    # The compile probe: 8 new schemas (none of the run's, so each compiles) beside a steady
    # batch of 64 decoding requests, then the same 8 unconstrained; each arm timed until all 8
    # have a token.
    probe = r["compile_probe"]
    assert probe["probe_requests"] == 8 and probe["background_requests"] == 64
    assert r["num_compiles"] == 8 + 8
    for arm in ("structured", "unconstrained"):
        assert probe[f"{arm}_steps"] >= 1 and probe[f"{arm}_window_s"] > 0
        assert 0 < probe[f"{arm}_step_ms_p50"] <= probe[f"{arm}_step_ms_p99"] <= probe[f"{arm}_step_ms_max"]
    assert probe["structured_steps_while_compiling"] >= 1
    assert probe["unconstrained_steps_while_compiling"] == 0
    # --trace: the host's phases of the structured run's pipelined steps (full batch), in
    # order; no device timeline without a GPU, and no pipelined steps unconstrained.
    host = r["trace"]["structured"]["host"]
    assert host["steps"] >= 1
    for phase in ("collect", "record", "plan", "launch_prepare", "bitmask_wait", "finish_sampling", "launch"):
        assert host[f"{phase}_ms"] >= 0, phase
    assert r["trace"]["structured"]["gpu"]["steps"] == 0
    assert r["trace"]["unconstrained"]["host"]["steps"] == 0
    assert r["early_inputs"] and r["grammar_threads"] == 1
