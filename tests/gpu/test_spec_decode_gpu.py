"""Speculative decoding on a GPU in bfloat16 with CUDA graphs (the draft model's decode
graphs, the target's verification steps, asynchronous scheduling around them): greedy
output is plain decoding's for n-gram proposals, a draft model that is the target itself
(every proposal accepted), a perturbed copy (some accepted) and a random EAGLE-3 head,
allowing one sequence to part on a bf16 near-tie (k + 1 positions at once and one at a time
round differently). Skipped without a GPU; tests/test_spec_decode*.py check exactness in
float32 on the CPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU (and compiled, not interpreted, Triton)", allow_module_level=True)

from raylm import LLM, SamplingParams  # noqa: E402
from tests.helpers import make_checkpoint, make_tokenizer  # noqa: E402
from tests.test_spec_decode import prompts_of  # noqa: E402
from tests.test_spec_decode_models import perturbed_copy  # noqa: E402
from tests.test_spec_eagle3 import save_head  # noqa: E402

K = 3
MAX_TOKENS = 32
COMMON = dict(dtype="bfloat16", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_gpu")
    # Small weights: greedy decoding repeats itself, so prompt lookup finds proposals.
    target = make_checkpoint(str(root / "target"), "llama", seed=5, num_hidden_layers=4,
                             initializer_range=0.05)
    save_head(str(root / "head"), len(make_tokenizer()), eagle_aux_hidden_state_layer_ids=[0, 2, 3])
    return {"target": target, "near": perturbed_copy(target, str(root / "near"), 0.01), "head": str(root / "head")}


def _run(model: str, prompts, spec=None, **kw):
    llm = LLM(model, speculative_config=spec, **{**COMMON, **kw})
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                            use_tqdm=False)
        runner = llm.llm_engine.executor.runner
        draft = runner.spec.proposer.runner if runner.spec is not None and runner.spec.method == "draft_model" else None
        graphs = runner.graphs is not None and (draft is None or draft.graphs is not None)
        return [o.outputs[0].token_ids for o in outs], llm.stats(), graphs
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def plain(dirs):
    prompts = prompts_of([5, 31, 18, 9, 60, 120], seed=1)
    tokens, _, graphs = _run(dirs["target"], prompts)
    assert graphs
    return prompts, tokens


@pytest.mark.parametrize("which", ["ngram", "target", "near", "head"])
def test_greedy_speculation_in_bf16_with_graphs_equals_plain_decoding(dirs, plain, which):
    prompts, ref = plain
    spec = ({"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
            if which == "ngram" else
            {"method": "eagle3", "model": dirs["head"], "num_speculative_tokens": K} if which == "head" else
            {"method": "draft_model", "model": dirs[which], "num_speculative_tokens": K})
    tokens, stats, graphs = _run(dirs["target"], prompts, spec)
    assert graphs  # the target's (and a draft model's) CUDA graphs were captured and used
    same = sum(a == b for a, b in zip(tokens, ref))
    assert same >= len(prompts) - 1, (which, tokens, ref)
    assert stats["spec_decode_num_draft_tokens"] > 0 and stats["blocks_in_use"] == 0
    rate = stats["spec_decode_acceptance_rate"]
    if which == "target":  # its own draft: bf16 near-ties aside, everything accepted
        assert rate > 0.9, rate
    elif which in ("ngram", "near"):
        assert rate > 0, rate
