"""The oracle: greedy tokens and log-probabilities equal transformers' in float32 on CPU,
for every architecture, in every scheduling mode (chunked prefill, prefix hits,
preemption)."""
import random

import pytest

from raylm import LLM, SamplingParams
from tests.helpers import ARCH_CONFIGS, hf_greedy, hf_prompt_logprobs, make_checkpoint

MAX_TOKENS = 8


def prompts_of(vocab: int, lengths, seed=0, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def check_against_hf(model_dir, outputs, prompts):
    for out, prompt in zip(outputs, prompts):
        ref, ref_lps = hf_greedy(model_dir, prompt, MAX_TOKENS)
        comp = out.outputs[0]
        assert comp.token_ids == ref, f"prompt of {len(prompt)} tokens diverged"
        assert comp.finish_reason == "length"
        lps = [comp.logprobs[i][tok].logprob for i, tok in enumerate(comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_greedy_matches_hf_mixed_batch(arch, checkpoint_dirs):
    d = checkpoint_dirs[arch]
    llm = LLM(d, dtype="float32", max_model_len=128)
    prompts = prompts_of(llm.get_tokenizer().vocab_size, [3, 17, 40, 9, 64])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check_against_hf(d, outs, prompts)
    assert [o.prompt_token_ids for o in outs] == prompts
    llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_matches_hf(arch, checkpoint_dirs):
    d = checkpoint_dirs[arch]
    llm = LLM(d, dtype="float32", max_model_len=128, max_num_batched_tokens=16, block_size=4)
    prompts = prompts_of(300, [50, 7, 33, 21], seed=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check_against_hf(d, outs, prompts)
    assert llm.stats()["num_mixed_steps"] > 0
    llm.shutdown()


@pytest.mark.parametrize("arch", ["llama31", "qwen2"])
def test_prefix_cache_hits_match_hf(arch, checkpoint_dirs):
    d = checkpoint_dirs[arch]
    llm = LLM(d, dtype="float32", max_model_len=128, block_size=8)
    shared = prompts_of(300, [40], seed=2)[0]
    first = llm.generate({"prompt_token_ids": shared + [5, 6]}, GREEDY, use_tqdm=False)
    prompts = prompts_of(300, [3, 11, 1], seed=3, prefix=shared)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check_against_hf(d, first + outs, [shared + [5, 6]] + prompts)
    assert llm.stats()["prefix_cache_hit_tokens"] >= 3 * 40 // 8 * 8
    assert all(o.num_cached_tokens >= 40 // 8 * 8 for o in outs)
    llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_preemption_matches_hf(arch, checkpoint_dirs):
    d = checkpoint_dirs[arch]
    # A pool for one full 64-token sequence (16 blocks of 4) but not the whole batch.
    probe = LLM(d, dtype="float32", max_model_len=64, block_size=4)
    per_block = probe.llm_engine.executor.kv_bytes_per_block()
    probe.shutdown()
    llm = LLM(d, dtype="float32", max_model_len=64, block_size=4, kv_cache_memory_bytes=16 * per_block)
    prompts = prompts_of(300, [30, 25, 28, 20], seed=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check_against_hf(d, outs, prompts)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["blocks_in_use"] == 0
    llm.shutdown()


def test_sharded_checkpoint_and_prompt_logprobs(tmp_path):
    d = make_checkpoint(str(tmp_path / "sharded"), "qwen3", sharded=True)
    import os
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    llm = LLM(d, dtype="float32", max_model_len=128, max_num_batched_tokens=8)
    prompt = prompts_of(300, [20], seed=5)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0,
                        prompt_logprobs=3)
    out = llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]
    check_against_hf(d, [out], [prompt])
    ref = hf_prompt_logprobs(d, prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert len(entry) in (3, 4) and prompt[i] in entry
        assert abs(entry[prompt[i]].logprob - ref[i - 1]) < 1e-4
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks[:3] == [1, 2, 3]
    llm.shutdown()
