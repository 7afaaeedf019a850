"""N-gram speculative decoding in the engine: token for token the output of plain
decoding and of transformers (float32, CPU), with proposals accepted (the checkpoint's
small weights make greedy decoding fall into cycles that prompt lookup finds), in every
scheduling mode: chunked prefill, prefix hits, preemption, n > 1, stop strings and stop
tokens inside the accepted proposals, seeded sampling, logits processors, asynchronous
scheduling around speculative steps; and vLLM's spec-decode metrics."""
import random

import pytest

from raylm import LLM, SamplingParams
from raylm.engine.metrics import render_metrics
from tests.helpers import hf_greedy, make_checkpoint

K = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
COMMON = dict(dtype="float32", max_model_len=160)
MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def cyc_dir(tmp_path_factory):
    """A llama whose greedy decoding repeats itself (small weights: the last tokens
    weigh most), so that prompt lookup's proposals get accepted."""
    return make_checkpoint(str(tmp_path_factory.mktemp("spec") / "cyc"), "llama", seed=5,
                           initializer_range=0.05)


def prompts_of(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def run(model_dir, prompts, params=GREEDY, spec=NGRAM, **kw):
    """(outputs, stats) of one engine over `prompts`."""
    llm = LLM(model_dir, speculative_config=spec, **{**COMMON, **kw})
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return outs, llm.stats()
    finally:
        llm.shutdown()


def completions(outs):
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outs]


def assert_same_logprobs(outs, ref, tol=1e-4):
    for a, b in zip(outs, ref):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert (ca.logprobs is None) == (cb.logprobs is None)
            for la, lb in zip(ca.logprobs or (), cb.logprobs or ()):
                assert la.keys() == lb.keys()
                assert all(abs(la[t].logprob - lb[t].logprob) < tol for t in la)


def check_hf(model_dir, outs, prompts, max_tokens=MAX_TOKENS):
    for out, prompt in zip(outs, prompts):
        ref, ref_lps = hf_greedy(model_dir, prompt, max_tokens)
        comp = out.outputs[0]
        assert comp.token_ids == ref, f"prompt of {len(prompt)} tokens diverged from transformers"
        lps = [comp.logprobs[i][t].logprob for i, t in enumerate(comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4


def accepted(stats) -> int:
    assert stats["spec_decode_num_drafts"] > 0
    assert stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert sum(stats["spec_decode_num_accepted_tokens_per_pos"]) == stats["spec_decode_num_accepted_tokens"]
    return stats["spec_decode_num_accepted_tokens"]


def test_greedy_equals_plain_decoding_and_hf_with_proposals_accepted(cyc_dir):
    prompts = prompts_of([5, 23, 40, 12])
    plain, plain_stats = run(cyc_dir, prompts, spec=None)
    outs, stats = run(cyc_dir, prompts)
    assert completions(outs) == completions(plain)
    assert_same_logprobs(outs, plain)
    check_hf(cyc_dir, outs, prompts)
    assert accepted(stats) > 0
    assert 0 < stats["spec_decode_acceptance_rate"] <= 1
    assert stats["generation_tokens"] == plain_stats["generation_tokens"] == 4 * MAX_TOKENS
    assert stats["num_steps"] < plain_stats["num_steps"]  # several tokens per verified row
    assert stats["blocks_in_use"] == 0
    assert "spec_decode_num_drafts" not in plain_stats


@pytest.mark.parametrize("extra", [
    dict(max_num_batched_tokens=16, block_size=4),  # chunked prefill; proposals trimmed to the budget
    dict(block_size=4, max_num_seqs=3),  # rollbacks that free blocks (tables truncated)
])
def test_chunked_prefill_and_small_blocks_match_hf(cyc_dir, extra):
    prompts = prompts_of([50, 7, 33, 21], seed=1)
    outs, stats = run(cyc_dir, prompts, **extra)
    check_hf(cyc_dir, outs, prompts)
    assert accepted(stats) > 0
    if "max_num_batched_tokens" in extra:
        assert stats["num_mixed_steps"] > 0


def test_prefix_hits_match_hf(cyc_dir):
    shared = prompts_of([40], seed=2)[0]
    llm = LLM(cyc_dir, speculative_config=NGRAM, block_size=8, **COMMON)
    first = llm.generate({"prompt_token_ids": shared + [5, 6]}, GREEDY, use_tqdm=False)
    prompts = [shared + p for p in prompts_of([3, 11, 1], seed=3)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    check_hf(cyc_dir, first + outs, [shared + [5, 6]] + prompts)
    stats = llm.stats()
    assert stats["prefix_cache_hit_tokens"] >= 3 * 40 // 8 * 8
    assert accepted(stats) > 0
    llm.shutdown()


def test_preemption_matches_hf(cyc_dir):
    probe = LLM(cyc_dir, block_size=4, **COMMON)
    per_block = probe.llm_engine.executor.kv_bytes_per_block()
    probe.shutdown()
    # Room for about two of the four sequences: the others are preempted and recompute.
    prompts = prompts_of([30, 25, 28, 20], seed=4)
    outs, stats = run(cyc_dir, prompts, block_size=4, max_model_len=80,
                      kv_cache_memory_bytes=20 * per_block)
    check_hf(cyc_dir, outs, prompts)
    assert stats["num_preemptions"] > 0 and stats["blocks_in_use"] == 0
    assert accepted(stats) > 0


def test_seeded_sampling_n2_penalties_and_processors_equal_plain_decoding(cyc_dir):
    """Seeded draws depend on (seed, output position) alone, so speculation changes no
    token; penalties and bad words see earlier proposals as outputs."""
    prompts = prompts_of([9, 30], seed=6)
    params = [SamplingParams(n=2, temperature=0.05, seed=11, max_tokens=30, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.05, seed=3, max_tokens=30, ignore_eos=True, top_k=5,
                             presence_penalty=0.2, logit_bias={7: 1.0}, bad_words=["fox"])]
    plain, _ = run(cyc_dir, prompts, params, spec=None)
    outs, stats = run(cyc_dir, prompts, params)
    assert completions(outs) == completions(plain)
    assert_same_logprobs(outs, plain)
    assert accepted(stats) > 0


def test_stop_tokens_strings_and_max_tokens_inside_accepted_proposals(cyc_dir):
    prompts = prompts_of([6, 14], seed=7)
    ref, stats = run(cyc_dir, prompts)
    assert accepted(stats) > 0
    # Stop at a token that the cycle repeats, late enough that proposals carry it.
    ids = ref[0].outputs[0].token_ids
    stop_tok = ids[20]
    text = ref[1].outputs[0].text
    stop_str = text[len(text) // 2:len(text) // 2 + 3]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_tok]),
              SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=[stop_str], ignore_eos=True)]
    params += [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 2, 7, 23)]
    many = [prompts[0], prompts[1]] + [prompts[0]] * 4
    plain, _ = run(cyc_dir, many, params, spec=None)
    outs, stats = run(cyc_dir, many, params)
    assert completions(outs) == completions(plain)
    assert accepted(stats) > 0
    assert outs[0].outputs[0].token_ids[-1] == stop_tok and outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].finish_reason == "stop" and stop_str not in outs[1].outputs[0].text
    assert [len(o.outputs[0].token_ids) for o in outs[2:]] == [1, 2, 7, 23]


def test_async_scheduling_around_speculative_steps(cyc_dir):
    """Above disable_by_batch_size the engine schedules asynchronously without proposals;
    below it, it records the step in flight and verifies proposals synchronously."""
    prompts = prompts_of([5, 9, 14, 3, 20], seed=8)
    spec = dict(NGRAM, disable_by_batch_size=2)
    plain, _ = run(cyc_dir, prompts, spec=None)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2)
              for m in (8, 16, 24, 32, MAX_TOKENS)]  # the batch shrinks as they finish
    plain, _ = run(cyc_dir, prompts, params, spec=None)
    outs, stats = run(cyc_dir, prompts, params, spec=spec, async_scheduling=True)
    assert completions(outs) == completions(plain)
    assert_same_logprobs(outs, plain)
    assert accepted(stats) > 0


def test_grammar_requests_get_no_proposals_and_keep_their_grammar(cyc_dir):
    from raylm import StructuredOutputsParams

    prompts = prompts_of([8, 8], seed=9)
    params = [SamplingParams(temperature=0.0, max_tokens=20,
                             structured_outputs=StructuredOutputsParams(regex="(ab|ba)+c")),
              GREEDY]
    plain, _ = run(cyc_dir, prompts, params, spec=None)
    outs, stats = run(cyc_dir, prompts, params)
    assert completions(outs) == completions(plain)
    assert accepted(stats) > 0


def test_metrics_render_vllm_spec_decode_counters(cyc_dir):
    _, stats = run(cyc_dir, prompts_of([12, 20], seed=10))
    text = render_metrics("m", [stats], [{"histograms": {k: ([0] * 30, 0.0) for k in ("ttft", "itl", "e2e")},
                                          "success": {}}]).decode()
    n = stats["spec_decode_num_accepted_tokens"]
    assert n > 0
    assert f'raylm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {float(n)}' in text
    assert f'raylm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} ' \
           f'{float(stats["spec_decode_num_drafts"])}' in text
    assert 'raylm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"}' in text
    for pos, count in enumerate(stats["spec_decode_num_accepted_tokens_per_pos"]):
        assert (f'raylm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="m",'
                f'position="{pos}"}} {float(count)}') in text
    assert "spec_decode" not in render_metrics("m", [{}], []).decode()


def test_tp2_matches_tp1_and_hf(cyc_dir, ray_session):
    """Ranks > 0 compute every verified position's logits with rank 0 (the LM head's
    gather) and take no part in verification; the result crosses the wire."""
    prompts = prompts_of([7, 26], seed=11)
    ref, _ = run(cyc_dir, prompts)
    outs, stats = run(cyc_dir, prompts, tensor_parallel_size=2, block_size=4)
    check_hf(cyc_dir, outs, prompts)
    assert_same_logprobs(outs, ref)
    assert accepted(stats) > 0
