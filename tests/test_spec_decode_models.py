"""Draft-model and EAGLE-3 speculative decoding in the engine (float32, CPU): greedy
output token for token that of plain decoding and of transformers (logprobs within
1e-4) with a draft that is the target itself (everything accepted), a perturbed copy
(some accepted) and a random EAGLE-3 head (nothing accepted), under chunked prefill,
preemption, n > 1, stop strings, stop tokens and max_tokens inside a proposal, and at
tensor_parallel_size 2;
sampling with a draft model is distributed as without it (chi-square against the exact
marginals of a 12-token vocabulary model) and seeded requests give the same tokens
alone or batched."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from raylm import LLM, SamplingParams
from tests.helpers import hf_model, make_checkpoint
from tests.test_spec_decode import accepted, assert_same_logprobs, check_hf, completions, prompts_of
from tests.test_spec_decode import run as spec_decode_run
from tests.test_spec_eagle3 import save_head

K = 3
COMMON = dict(dtype="float32", max_model_len=160, block_size=4)
MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)


def perturbed_copy(src: str, dst: str, std: float, seed: int = 0) -> str:
    """The checkpoint of `src` with Gaussian noise on every weight: a draft that agrees
    with the target often, not always."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    path = os.path.join(dst, "model.safetensors")
    sd = load_file(path)
    save_file({k: (v + std * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}, path)
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_models")
    target = make_checkpoint(str(root / "target"), "llama", seed=5, num_hidden_layers=8)
    save_head(str(root / "head"), AutoConfig.from_pretrained(target).vocab_size)
    return {"target": target, "near": perturbed_copy(target, str(root / "near"), 0.01),
            "small": make_checkpoint(str(root / "small"), "llama", seed=4, num_hidden_layers=1,
                                     hidden_size=32, intermediate_size=64),
            "head": str(root / "head")}


def spec_of(dirs, which):
    if which == "head":
        return {"method": "eagle3", "model": dirs["head"], "num_speculative_tokens": K}
    return {"method": "draft_model", "model": dirs[which], "num_speculative_tokens": K}


def run(model_dir, prompts, params=GREEDY, spec=None, **kw):
    """(outputs, stats) of one engine (test_spec_decode.run with this module's settings)."""
    return spec_decode_run(model_dir, prompts, params, spec, **{**COMMON, **kw})


@pytest.fixture(scope="module")
def plain(dirs):
    prompts = prompts_of([5, 31, 18, 9], seed=1)
    return prompts, run(dirs["target"], prompts)[0]


@pytest.mark.parametrize("which", ["target", "near", "small", "head"])
def test_greedy_equals_plain_decoding_and_hf(dirs, plain, which):
    prompts, ref = plain
    outs, stats = run(dirs["target"], prompts, spec=spec_of(dirs, which))
    assert completions(outs) == completions(ref)
    assert_same_logprobs(outs, ref)
    n = accepted(stats)
    if which == "target":  # its own draft: every proposal accepted
        assert n == stats["spec_decode_num_draft_tokens"] > 0
        assert stats["spec_decode_acceptance_rate"] == 1.0
    elif which == "near":
        assert 0 < n < stats["spec_decode_num_draft_tokens"]
    assert stats["blocks_in_use"] == 0
    if which == "near":
        check_hf(dirs["target"], outs, prompts, MAX_TOKENS)


@pytest.mark.parametrize("which", ["near", "head"])
def test_chunked_prefill_and_preemption(dirs, plain, which):
    prompts, ref = plain
    probe = LLM(dirs["target"], speculative_config=spec_of(dirs, which), **COMMON)
    per_block = probe.llm_engine.executor.kv_bytes_per_block()
    runner = probe.llm_engine.executor.runner
    own = 2 * len(runner.attn_layers) * 4 * runner.kv_shape_per_layer[0] * runner.kv_shape_per_layer[1] * 4
    assert per_block == own + runner.spec.kv_bytes_per_block() > own  # one pool for both models
    probe.shutdown()
    outs, stats = run(dirs["target"], prompts, spec=spec_of(dirs, which), max_num_batched_tokens=16)
    assert completions(outs) == completions(ref)
    assert stats["num_mixed_steps"] > 0
    # Room for about two of the four sequences: the others are preempted and recompute.
    outs, stats = run(dirs["target"], prompts, spec=spec_of(dirs, which), max_model_len=64,
                      kv_cache_memory_bytes=24 * per_block)
    assert completions(outs) == completions(ref)
    assert stats["num_preemptions"] > 0 and stats["blocks_in_use"] == 0
    assert_same_logprobs(outs, ref)


@pytest.mark.parametrize("which", ["target", "head"])
def test_stops_max_tokens_and_n2_inside_proposals(dirs, plain, which):
    prompts, ref = plain
    ids = ref[1].outputs[0].token_ids
    text = ref[2].outputs[0].text
    stop_str = text[len(text) // 2:len(text) // 2 + 3]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[ids[10]]),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=[stop_str], ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)]
    params += [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 2, 5, 9)]
    many = [prompts[1], prompts[2], prompts[0]] + [prompts[3]] * 4
    base, _ = run(dirs["target"], many, params)
    outs, stats = run(dirs["target"], many, params, spec=spec_of(dirs, which))
    assert completions(outs) == completions(base)
    assert outs[0].outputs[0].finish_reason == "stop" and outs[0].outputs[0].token_ids[-1] == ids[10]
    assert outs[1].outputs[0].finish_reason == "stop" and stop_str not in outs[1].outputs[0].text
    assert [len(o.outputs[0].token_ids) for o in outs[3:]] == [1, 2, 5, 9]
    if which == "target":
        assert accepted(stats) == stats["spec_decode_num_draft_tokens"]


@pytest.mark.parametrize("which,backend,draft_tp", [("near", "ray", None), ("head", "ray_broadcast", None),
                                                    ("near", "ray_broadcast", 1)])
def test_tp2_equals_plain_decoding_and_hf(dirs, plain, which, backend, draft_tp, ray_session):
    """At tensor_parallel_size 2 the draft model (or EAGLE head) runs sharded on both
    ranks: rank 0 decides what it computes and broadcasts that, rank 1 follows. With
    draft_tensor_parallel_size 1 the draft model runs whole on rank 0 alone."""
    prompts, ref = plain
    spec = dict(spec_of(dirs, which), **({"draft_tensor_parallel_size": draft_tp} if draft_tp else {}))
    llm = LLM(dirs["target"], speculative_config=spec, tensor_parallel_size=2,
              distributed_executor_backend=backend, **COMMON)
    try:
        kv_bytes = [info["kv_bytes_per_block"] for info in llm.llm_engine.executor.worker_info()]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        stats = llm.stats()
    finally:
        llm.shutdown()
    # A solo draft's KV (all its heads) is on rank 0 only; a sharded one's half on each rank.
    assert kv_bytes[0] > kv_bytes[1] if draft_tp == 1 else kv_bytes[0] == kv_bytes[1]
    assert completions(outs) == completions(ref)
    assert_same_logprobs(outs, ref)
    assert stats["spec_decode_num_draft_tokens"] > 0 and stats["blocks_in_use"] == 0
    if which == "near":
        assert 0 < accepted(stats) < stats["spec_decode_num_draft_tokens"]
        check_hf(dirs["target"], outs, prompts, MAX_TOKENS)


def test_seeded_requests_equal_alone_and_batched(dirs):
    prompts = prompts_of([7, 20, 12], seed=3)
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=16, ignore_eos=True, top_k=40)
              for s in (1, 2, 3)]
    spec = spec_of(dirs, "near")
    batched, stats = run(dirs["target"], prompts, params, spec=spec)
    assert accepted(stats) > 0
    for p, sp, out in zip(prompts, params, batched):
        alone, _ = run(dirs["target"], [p], sp, spec=spec)
        assert alone[0].outputs[0].token_ids == out.outputs[0].token_ids


# ---- the output distribution under sampling ----------------------------------------
V = 12
TEMPERATURE = 0.7
PROMPT = [1, 5, 3]
N = 1500
CHI2_CRITICAL_11_DOF = 31.26  # p = 0.001


def tiny_vocab_model(path: str, seed: int, scale: float) -> str:
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=scale, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@torch.no_grad()
def exact_marginals(model_dir: str) -> list[torch.Tensor]:
    """The target's distribution of output tokens 1, 2 and 3 (enumerating contexts)."""
    model = hf_model(model_dir)

    def probs(ctx):
        return torch.softmax(model(torch.tensor([ctx])).logits[0, -1].double() / TEMPERATURE, -1)

    p1 = probs(PROMPT)
    m2, m3 = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        p2 = probs(PROMPT + [a])
        m2 += p1[a] * p2
        for b in range(V):
            m3 += p1[a] * p2[b] * probs(PROMPT + [a, b])
    return [p1, m2, m3]


def chi2(counts: list[int], expected: torch.Tensor) -> float:
    e = expected * sum(counts)
    return float(sum((c - x) ** 2 / x for c, x in zip(counts, e.tolist())))


def test_sampling_with_a_draft_model_is_distributed_as_the_target(tmp_path):
    target = tiny_vocab_model(str(tmp_path / "t"), seed=0, scale=0.6)
    # The same weights scaled down: a flatter draft, right often but not always.
    draft = tiny_vocab_model(str(tmp_path / "d"), seed=0, scale=0.35)
    # Token 1 from the prompt's sampling; tokens 2 and 3 verified proposals or resampled.
    params = [SamplingParams(temperature=TEMPERATURE, seed=s, max_tokens=4, ignore_eos=True)
              for s in range(N)]
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}
    outs, stats = run(target, [PROMPT] * N, params, spec=spec, skip_tokenizer_init=True, max_model_len=64)
    rate = stats["spec_decode_acceptance_rate"]
    # Both accepting and rejecting (and resampling from the residual) happen.
    assert stats["spec_decode_num_draft_tokens"] >= 2 * N and 0.2 < rate < 0.8, rate
    tokens = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == 4 for t in tokens)
    expected = exact_marginals(target)
    for pos in range(3):
        counts = [0] * V
        for t in tokens:
            counts[t[pos]] += 1
        assert chi2(counts, expected[pos]) < CHI2_CRITICAL_11_DOF, (pos, counts)
    # The test can tell: the draft's own marginals are far off.
    d3 = exact_marginals(draft)[2]
    counts = [0] * V
    for t in tokens:
        counts[t[2]] += 1
    assert chi2(counts, d3) > 3 * CHI2_CRITICAL_11_DOF
