"""benchmarks/record.py builds the current-state tables of benchmarks/RESULTS.md from the
result files: one record or a list per file, the newest record per configuration, records
marked superseded or dropped left out; and the committed block is what the committed JSON
gives."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import record  # noqa: E402


def _throughput(date: str, tok_s: float, **extra) -> dict:
    return {"benchmark": "throughput", "model": "tiny", "device": "GPU X", "date": date,
            "command": "python benchmarks/throughput.py --model tiny", "num_requests": 256,
            "tensor_parallel_size": 1, "num_groups": 1, "raylm_output_tok_per_s": tok_s,
            "roofline_output_tok_per_s": 2 * tok_s, "fraction_of_roofline": 0.5, "raylm_startup_s": 3.0, **extra}


def _serving(date: str) -> dict:
    return {"benchmark": "serving", "model": "tiny", "device": "GPU X", "date": date,
            "command": "python benchmarks/serving.py --model tiny", "num_requests": 512, "max_concurrency": 256,
            "min_len": 100, "max_len": 1024, "num_groups": 1, "tensor_parallel_size": 1,
            "raylm_output_tok_per_s": 7460.0, "peer": "vllm-0.26.0", "peer_output_tok_per_s": 10394.0,
            "ttft_ms": {"mean": None, "p50": 1470.0, "p99": None}, "tpot_ms": {"mean": None, "p50": 32.9, "p99": None},
            "itl_ms": {"mean": None, "p50": None, "p99": 558.0},
            "peer_latency_ms": {"ttft_p50_ms": 3550, "tpot_p50_ms": 21.8, "itl_p99_ms": 74},
            "label": "before: one scheduler process for every group"}


@pytest.fixture
def results(tmp_path):
    """A results dir with a file of one record and a subfolder file holding a list."""
    d = tmp_path / "results"
    (d / "sub").mkdir(parents=True)
    (d / "old.json").write_text(json.dumps(_throughput("2026-11-01", 1000.0)))
    (d / "sub" / "runs.json").write_text(json.dumps([
        _throughput("2026-12-01", 2000.0),
        _throughput("2026-12-02", 9999.0, superseded_by="nothing: a test of the mark"),
        _throughput("2026-12-01", 1500.0, async_scheduling="off"),
        _serving("2026-12-01")]))
    return d


def test_current_state_takes_one_record_or_a_list_and_the_newest_per_configuration(results):
    records = record.load_records(str(results))
    assert sorted({r["_path"] for r in records}) == ["old.json", "sub/runs.json"] and len(records) == 5
    block = record.current_state(records)
    assert block.startswith(record.BEGIN) and block.endswith(record.END)
    lines = block.splitlines()
    rows = [x for x in lines if x.startswith("| tiny |")]
    # Throughput: the 2026-12-01 record beats the older one; async off is its own configuration;
    # the superseded record stays out however new it is.
    assert any("| 2,000 |" in x and "[sub/runs.json](results/sub/runs.json)" in x for x in rows)
    assert any("| 1,500 |" in x and "asynchronous scheduling off" in x for x in rows)
    assert not any("| 1,000 |" in x or "9,999" in x for x in rows)
    # Serving: the peer beside us, the ratio, latencies with the peer's in parentheses, the label.
    serving = next(x for x in rows if "7,460" in x)
    for cell in ("vLLM 0.26.0", "10,394", "0.72x", "1,470 (vLLM 3,550)", "32.9 (vLLM 21.8)", "558 (vLLM 74.0)",
                 "before: one scheduler process for every group", "`python benchmarks/serving.py --model tiny`"):
        assert cell in serving, cell
    assert "### Offline throughput" in block and "### Serving over HTTP" in block
    assert "### Batch-1 latency" not in block  # no records, no table


def test_write_replaces_only_the_block_and_check_sees_staleness(results, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\nintro\n\n{record.BEGIN}\nstale\n{record.END}\n\n## Findings\n\nkept\n")
    args = ["--results-dir", str(results), "--md", str(md)]
    assert record.main(args + ["--check"]) == 1
    assert record.main(args + ["--write"]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n\nintro\n\n" + record.BEGIN)
    assert text.endswith(record.END + "\n\n## Findings\n\nkept\n")
    assert "stale" not in text and "| 2,000 |" in text
    assert record.main(args + ["--check"]) == 0


def test_two_records_of_one_date_for_one_configuration_are_an_error(results):
    (results / "rerun.json").write_text(json.dumps(_throughput("2026-12-01", 2100.0)))
    with pytest.raises(ValueError, match="superseded_by"):
        record.current_state(record.load_records(str(results)))


def test_committed_block_is_what_the_committed_results_give():
    with open(record.RESULTS_MD) as f:
        committed = record.current_block(f.read())
    assert committed == record.current_state(record.load_records()), \
        "benchmarks/RESULTS.md is stale: run python benchmarks/record.py --write"


def test_every_committed_record_has_a_summary_line():
    for r in record.load_records():
        assert record.row(r).startswith(f"| {r['date']} | {r['benchmark']} |"), r["_path"]


def test_attention_rows_name_backends_more_than_5_percent_behind():
    """The per-operation attention table says where a backend is more than 5 % behind the
    fastest, and why where known (issue: "or the table says where and why not")."""
    rows = [{"op": "decode", "batch_size": 1, "context_len": 32768, "num_tokens": 1, "backend": b,
             "us": us, "floor_us": 40.0} for b, us in [("triton", 50.0), ("flashinfer", 52.0),
                                                       ("flash_attn", 400.0)]]
    rows += [{"op": "prefill", "batch_size": 1, "context_len": 2048, "num_tokens": 2048, "backend": b,
              "us": us, "floor_us": 30.0} for b, us in [("triton", 100.0), ("flashinfer", None),
                                                        ("flash_attn", 97.0)]]
    r = {"benchmark": "attention", "model": "tiny", "device": "GPU X", "block_size": 16,
         "kv_cache_dtype": "auto", "rows": rows}
    decode, prefill = record._attention(r)
    assert decode.note == "flash_attn 8.00x triton (no split-KV on SM90: one program per sequence and head leaves SMs idle)"
    assert prefill.note == ""  # triton 3 % behind; flashinfer refused the shape (its cell says so)
    assert prefill.cells[4]["flashinfer"] == "refused"
