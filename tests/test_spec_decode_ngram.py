"""N-gram (prompt-lookup) proposals against a brute-force scan, incremental use, and the
`speculative_config` engine argument.

Host time (benchmarks/spec_ngram_host.py, 2-core CPU, 256 requests x 2,048-token
contexts, k=4, each step appending 1..k+1 tokens): n 5..5 (vLLM's default) about 0.5 ms
per batch, n 2..5 about 1.4 ms; indexing the prompts on the first call 0.1 s / 0.4 s."""
import json
import random
import sys

import pytest

from raylm.engine.config import EngineArgs
from raylm.engine.spec_decode.config import SpeculativeConfig, parse_speculative_config
from raylm.engine.spec_decode.ngram import NgramProposer


def brute_force(tokens, k, lo, hi):
    """Longest n in [lo, hi] whose last-n suffix occurred earlier; the k tokens that
    followed its latest earlier occurrence, in the context extended by repeating it with
    the period between the two occurrences."""
    L = len(tokens)
    for n in range(hi, lo - 1, -1):
        if n >= L:
            continue
        suffix = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                period = L - n - i
                ext = list(tokens)
                while len(ext) < i + n + k:
                    ext.append(ext[-period])
                return ext[i + n:i + n + k]
    return []


@pytest.mark.parametrize("lo,hi,vocab", [(1, 1, 4), (2, 5, 3), (3, 3, 6), (1, 4, 20)])
def test_incremental_proposals_equal_a_full_scan(lo, hi, vocab):
    rng = random.Random(lo * 100 + hi)
    prop = NgramProposer(4, lo, hi)
    seqs = {f"r{i}": [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for i in range(8)}
    found = 0
    for _ in range(60):
        ids = list(seqs)
        got = prop.propose(ids, [seqs[r] for r in ids])
        for rid, g in zip(ids, got):
            want = brute_force(seqs[rid], 4, lo, hi)
            assert g == want, (rid, seqs[rid], g, want)
            found += bool(g)
        for rid in ids:  # grow by 1..5 tokens (accepted proposals and a bonus), some by 20
            seqs[rid] += [rng.randrange(vocab) for _ in range(rng.choice([1, 2, 3, 5, 20]))]
    assert found > 50


def test_max_num_tokens_remove_and_a_reused_id():
    prop = NgramProposer(3, 1, 2)
    toks = [5, 6, 7, 8, 5, 6]
    assert prop.propose(["a"], [toks]) == [[7, 8, 5]]
    assert prop.propose(["a"], [toks], max_num_tokens=[2]) == [[7, 8]]
    assert prop.propose(["a"], [toks], max_num_tokens=[0]) == [[]]
    prop.remove("a")
    # The match reaches the end: the copy goes on with the context's period (2 here, 1 below).
    assert prop.propose(["a"], [[1, 2, 1]]) == [[2, 1, 2]]
    # The same id with a shorter list is a new request: its index starts over.
    assert prop.propose(["a"], [[9, 9]]) == [[9, 9, 9]]
    assert prop.propose(["c"], [[4, 5, 6, 7, 5, 6]]) == [[7, 5, 6]]
    assert prop.propose(["b"], [[1]]) == [[]]


def test_ngram_proposer_rejects_bad_bounds():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(2, 3, 2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(0, 1, 2)


def test_host_benchmark_runs(capsys, monkeypatch):
    import benchmarks.spec_ngram_host as bench

    monkeypatch.setattr(sys, "argv", ["x", "--batch", "8", "--context", "300", "--steps", "5"])
    bench.main()
    assert "µs per batch" in capsys.readouterr().out


# ---- speculative_config ----------------------------------------------------------------
def test_speculative_config_parses_dicts_and_json():
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 3, 5, 5)
    assert not c.uses_draft_probs
    c = parse_speculative_config(json.dumps({"method": "ngram", "num_speculative_tokens": 2,
                                             "prompt_lookup_max": 4}))
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    c = parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_min": 2})
    assert (c.method, c.model, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", None, 2, 2)
    c = parse_speculative_config({"method": "eagle3", "model": "/ckpt/eagle", "num_speculative_tokens": 4,
                                  "draft_tensor_parallel_size": 1, "adaptive_num_speculative_tokens": True},
                                 tensor_parallel_size=2)
    assert c.uses_draft_probs and c.adaptive_num_speculative_tokens and c.draft_tensor_parallel_size == 1
    assert parse_speculative_config({"model": "/d", "num_speculative_tokens": 1}).method == "draft_model"
    assert parse_speculative_config(None) is None
    assert parse_speculative_config(c) is c and isinstance(c, SpeculativeConfig)


@pytest.mark.parametrize("spec,message", [
    ({"method": "eagle", "model": "x", "num_speculative_tokens": 2},
     r"\['method'\] must be one of \['ngram', 'draft_model', 'eagle3'\], got 'eagle'"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"\['num_speculative_tokens'\] must be an integer >= 1, got 0"),
    ({"method": "ngram", "num_speculative_tokens": True}, "an integer >= 1, got True"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, r"\['prompt_lookup_min'\].*got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min'\] \(4\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, r"\['model'\] must be unset for method 'ngram'"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, r"\['model'\] must be a checkpoint"),
    ({"method": "eagle3", "model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     r"\['prompt_lookup_max'\] must be unset for method 'eagle3'"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 3},
     r"draft_tensor_parallel_size'\] must be 1 or the target's tensor_parallel_size \(2\), got 3"),
    ({"method": "ngram", "num_speculative_tokens": 2, "acceptance_method": "typical"},
     r"unsupported keys \['acceptance_method'\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
     r"disable_by_batch_size'\] must be an integer >= 1, got 0"),
    ({"num_speculative_tokens": 2}, "needs 'method'"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a dict or a JSON object string"),
])
def test_speculative_config_errors_name_key_value_and_limit(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(spec, tensor_parallel_size=2)


def test_engine_args_validate_speculative_config_and_take_ngram():
    EngineArgs(speculative_config=None)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineArgs(speculative_config='{"method": "ngram"}')
    args = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert args.parsed_speculative_config().method == "ngram"
