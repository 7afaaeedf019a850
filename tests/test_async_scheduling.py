"""Asynchronous scheduling (`async_scheduling=True`: step N+1 is planned with placeholder
tokens and launched before step N's tokens reach the host) gives exactly what the
synchronous loop gives, and transformers' greedy tokens and log-probabilities, in every
scheduling mode: mixed batches, chunked prefill, prefix hits, preemption, early stops
(EOS, stop tokens, stop strings), n > 1 with seeds, penalties, prompt logprobs and abort.
On CPU the launch is synchronous, but the bookkeeping (placeholders, outputs one step
late, dropped tokens past a stop) is the same code the GPU runs."""
import random

import pytest

from raylm import LLM, SamplingParams
from raylm.engine.llm_engine import LLMEngine
from raylm.engine.config import EngineArgs
from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import PLACEHOLDER_TOKEN, Request
from raylm.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.helpers import hf_greedy, hf_prompt_logprobs

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)


def prompts_of(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def summary(outs):
    """Everything a caller sees of each output but the log-probability values."""
    return [[(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [sorted(d) for d in c.logprobs])
             for c in o.outputs] for o in outs]


def same(a, b):
    """Equal outputs; log-probabilities within 1e-5 (where scheduling differs, e.g. when a
    preemption lands, float32 sums may round differently)."""
    assert summary(a) == summary(b)
    for oa, ob in zip(a, b):
        for ca, cb in zip(oa.outputs, ob.outputs):
            for da, db in zip(ca.logprobs or [], cb.logprobs or []):
                assert all(abs(da[t].logprob - db[t].logprob) < 1e-5 for t in da)


def both(model_dir, prompts, params, **kw):
    """(sync outputs, async outputs, async engine stats) of the same requests."""
    res = {}
    max_model_len = kw.pop("max_model_len", 128)
    for mode in (False, True):
        llm = LLM(model_dir, dtype="float32", max_model_len=max_model_len, async_scheduling=mode, **kw)
        assert llm.llm_engine.async_scheduling is mode
        res[mode] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        res[f"stats{mode}"] = llm.stats()
        llm.shutdown()
    return res[False], res[True], res["statsTrue"]


def check_hf(model_dir, outs, prompts):
    for out, prompt in zip(outs, prompts):
        ref, ref_lps = hf_greedy(model_dir, prompt, MAX_TOKENS)
        comp = out.outputs[0]
        assert comp.token_ids == ref
        lps = [comp.logprobs[i][t].logprob for i, t in enumerate(comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}),
    ("qwen3", dict(max_num_batched_tokens=16, block_size=4)),  # chunked prefill, mixed steps
])
def test_greedy_matches_sync_and_hf(arch, kw, checkpoint_dirs):
    d = checkpoint_dirs[arch]
    prompts = prompts_of([3, 17, 40, 9, 50])
    sync, asyn, stats = both(d, prompts, GREEDY, **kw)
    same(asyn, sync)
    check_hf(d, asyn, prompts)
    assert stats["blocks_in_use"] == 0 and stats["num_requests_running"] == 0


def test_prefix_hits_and_preemption(checkpoint_dirs):
    d = checkpoint_dirs["llama"]
    probe = LLM(d, dtype="float32", max_model_len=64, block_size=4)
    per_block = probe.llm_engine.executor.kv_bytes_per_block()
    probe.shutdown()
    shared = prompts_of([24], seed=2)[0]
    prompts = prompts_of([30, 25], seed=4) + [shared + p for p in prompts_of([3, 5], seed=3)]
    sync, asyn, stats = both(d, prompts, GREEDY, max_model_len=64, block_size=4,
                             kv_cache_memory_bytes=16 * per_block)
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    same(asyn, sync)
    check_hf(d, asyn, prompts)
    assert stats["blocks_in_use"] == 0


def test_early_stops_drop_the_token_past_the_stop(checkpoint_dirs):
    """EOS, stop_token_ids and stop strings end a request in the step that samples them;
    the step already launched behind it computes one more token, which is never seen."""
    d = checkpoint_dirs["llama"]
    prompts = prompts_of([6, 12, 20, 9], seed=5)
    ref = LLM(d, dtype="float32", max_model_len=128)
    free = ref.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    ref.shutdown()
    # Stop each request at its 4th greedy token, three different ways.
    params = []
    for i, o in enumerate(free):
        c = o.outputs[0]
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[c.token_ids[3]]))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0, max_tokens=12, stop=[c.text.split()[-1]]
                                         if c.text.split() else None))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=3))
    sync, asyn, stats = both(d, prompts, params)
    same(asyn, sync)
    assert sync[0].outputs[0].finish_reason == "stop" and len(sync[0].outputs[0].token_ids) <= 4
    assert stats["blocks_in_use"] == 0


def test_sampling_n_seeds_penalties_and_prompt_logprobs(checkpoint_dirs):
    d = checkpoint_dirs["qwen3"]
    prompts = prompts_of([7, 19, 33], seed=6)
    params = [
        SamplingParams(n=3, temperature=0.9, top_p=0.9, seed=11, max_tokens=9, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.7, top_k=20, seed=5, max_tokens=7, ignore_eos=True,
                       repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=2),
    ]
    sync, asyn, _ = both(d, prompts, params)
    same(asyn, sync)
    ref = hf_prompt_logprobs(d, prompts[2])
    got = [e[prompts[2][i]].logprob for i, e in enumerate(asyn[2].prompt_logprobs) if i > 0]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4


def test_abort_mid_run_leaves_the_others_alone(checkpoint_dirs):
    d = checkpoint_dirs["llama"]
    prompts = prompts_of([5, 9, 14], seed=7)
    results = {}
    for mode in (False, True):
        engine = LLMEngine(EngineArgs(model=d, dtype="float32", max_model_len=128, async_scheduling=mode))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
        finished = {}
        for _ in range(3):
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
        aborted = engine.abort_request("1")
        assert aborted and aborted[0].outputs[0].finish_reason == "abort"
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
        assert "1" not in finished
        assert engine.block_manager.num_used_blocks == 0
        results[mode] = [finished["0"], finished["2"]]
        engine.shutdown()
    same(results[True], results[False])


def test_an_id_still_in_a_step_on_the_device_is_refused(checkpoint_dirs):
    """A request aborted (or finished) while a step that holds it is in flight keeps its
    id until that step is recorded: a new request with the id is refused, not handed the
    old request's token; after the step it is accepted and runs normally."""
    engine = LLMEngine(EngineArgs(model=checkpoint_dirs["llama"], dtype="float32", max_model_len=128,
                                  async_scheduling=True))
    prompts = prompts_of([5, 9], seed=3)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    for _ in range(3):
        engine.step()
    def in_flight(rid: str) -> bool:
        step = engine.core._inflight
        return step is not None and rid in {s.request_id for s in step[0].seqs}

    engine.abort_request("1")
    assert in_flight("1")  # its step is on the device
    with pytest.raises(ValueError, match="request_id '1' is already in use"):
        engine.add_request("1", {"prompt_token_ids": prompts[1]}, GREEDY)
    finished = {}
    while in_flight("1"):
        for o in engine.step():
            finished[o.request_id] = o
    engine.add_request("1", {"prompt_token_ids": prompts[1]}, GREEDY)  # the step is recorded: free again
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    assert finished["1"].outputs[0].finish_reason in ("stop", "length") and engine.block_manager.num_used_blocks == 0
    engine.shutdown()


def test_default_is_off_on_cpu(checkpoint_dirs):
    llm = LLM(checkpoint_dirs["llama"], dtype="float32", max_model_len=64)
    assert llm.llm_engine.async_scheduling is False  # the default is on for a GPU only
    llm.shutdown()


def test_scheduler_plans_past_placeholders():
    """The scheduler plans a decode of the placeholder, never hashes it into the prefix
    cache, and stops planning once the tokens in flight reach the output limit."""
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    sch = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), bm)
    req = Request("r", [5, 6, 7, 8, 9, 10, 11], max_output_tokens=3)
    sch.add_request(req)
    out = sch.schedule()
    assert out.seqs[0].token_ids == [5, 6, 7, 8, 9, 10, 11] and out.seqs[0].sample
    sch.update_after_step(out)
    req.append_placeholder()  # launched: its token is not known yet
    assert len(req.block_hashes) == 1  # [5..8]; the placeholder's block stays unhashed
    out = sch.schedule()
    assert out.seqs[0].token_ids == [PLACEHOLDER_TOKEN] and out.seqs[0].start_pos == 7
    sch.update_after_step(out)
    assert len(req.block_hashes) == 1  # positions 4..7 end in the placeholder: not hashed
    req.append_placeholder()
    req.resolve_placeholder(42)  # step 1's token arrives
    assert req.token_ids[7] == 42 and req.output_token_ids == [42] and req.num_pending == 1
    out = sch.schedule()
    assert out.seqs[0].token_ids == [PLACEHOLDER_TOKEN] and out.seqs[0].start_pos == 8
    sch.update_after_step(out)
    assert len(req.block_hashes) == 2  # positions 4..7 = [9, 10, 11, 42] are known now
    req.append_placeholder()
    assert req.output_limit_reached  # 1 sampled + 2 in flight = max_output_tokens
    assert not sch.schedule().seqs  # nothing more to plan until the tokens arrive
