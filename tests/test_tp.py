"""Tensor parallelism in Ray actors: TP=2 gives TP=1's and transformers' greedy tokens
and log-probabilities, shards weights and KV heads, replicates kv heads when there are
fewer than ranks, and gives its placement group back on shutdown."""
import asyncio
import os
import random
import shutil
import time

import pytest

from raylm import LLM, SamplingParams
from raylm.engine import ray_executor
from raylm.workers.messages import NewRequest, SamplingOptions, SeqChunk, StepPlan
from tests.helpers import hf_greedy, hf_prompt_logprobs, make_checkpoint

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
COMMON = dict(dtype="float32", max_model_len=128)


def prompts_of(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def generate(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_same_tokens_and_logprobs(outs, ref) -> None:
    """Each first completion has the reference's tokens and log-probabilities (1e-4)."""
    for a, b in zip(outs, ref):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        for la, lb in zip(ca.logprobs, cb.logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


def abort_one_mid_flight(engine, prompts) -> dict:
    """Start three requests, abort the middle one after two steps, run the rest to the
    end: {request id: final output} of those that finished (a0 and a2)."""
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", {"prompt_token_ids": p}, GREEDY)
    engine.step()
    engine.step()
    engine.abort_request("a1")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["a0", "a2"]
    return done


def check_hf(model_dir, outs, prompts):
    for out, prompt in zip(outs, prompts):
        ref, ref_lps = hf_greedy(model_dir, prompt, MAX_TOKENS)
        comp = out.outputs[0]
        assert comp.token_ids == ref, f"prompt of {len(prompt)} tokens diverged from transformers"
        lps = [comp.logprobs[i][t].logprob for i, t in enumerate(comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4


def wait_for_free_cpus(ray, timeout_s=10.0):
    """The cluster's CPUs all come back once actors and placement groups are gone."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, f"CPUs still reserved: {ray.available_resources()}"
        time.sleep(0.1)


def param_bytes(llm) -> int:
    return llm.llm_engine.executor.runner.parameter_bytes()


@pytest.mark.parametrize("arch,extra", [
    ("llama", {}),
    # Chunked prefill: prompts are split over several mixed steps.
    ("qwen3", dict(max_num_batched_tokens=16, block_size=4)),
])
def test_tp2_matches_tp1_and_hf(arch, extra, checkpoint_dirs, ray_session):
    d = checkpoint_dirs[arch]
    prompts = prompts_of([3, 17, 40, 9])
    tp1 = LLM(d, **COMMON, **extra)
    ref = generate(tp1, prompts)
    tp2 = LLM(d, tensor_parallel_size=2, **COMMON, **extra)
    outs = generate(tp2, prompts)
    check_hf(d, outs, prompts)
    assert_same_tokens_and_logprobs(outs, ref)
    if extra:
        assert tp2.stats()["num_mixed_steps"] > 0

    cfg = tp2.llm_engine.hf_config
    info = tp2.llm_engine.executor.worker_info()
    assert [i["rank"] for i in info] == [0, 1]
    assert all(i["num_kv_heads"] == cfg.num_key_value_heads // 2 for i in info)
    assert all(i["num_heads"] == cfg.num_attention_heads // 2 for i in info)
    full = param_bytes(tp1)
    for i in info:  # half of everything but the replicated norms
        assert abs(i["parameter_bytes"] - full / 2) < 0.1 * full / 2
    assert 2 * tp2.llm_engine.executor.kv_bytes_per_block() == tp1.llm_engine.executor.kv_bytes_per_block()
    tp1.shutdown()
    tp2.shutdown()
    wait_for_free_cpus(ray_session)


def test_single_kv_head_is_replicated(tmp_path, ray_session):
    d = make_checkpoint(str(tmp_path / "kv1"), "llama", num_key_value_heads=1)
    llm = LLM(d, tensor_parallel_size=2, **COMMON, max_num_batched_tokens=32)
    info = llm.llm_engine.executor.worker_info()
    assert [i["num_kv_heads"] for i in info] == [1, 1]
    prompts = prompts_of([25, 5], seed=1)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2,
                        prompt_logprobs=2)
    outs = generate(llm, prompts, sp)
    check_hf(d, outs, prompts)
    ref = hf_prompt_logprobs(d, prompts[0])
    got = [e[prompts[0][i]].logprob for i, e in enumerate(outs[0].prompt_logprobs) if i > 0]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4

    # The async path the global scheduler uses: one prefill step straight to the ranks.
    prompt = prompts[1]
    plan = StepPlan(seqs=[SeqChunk("direct", prompt, 0, [0, 1], True)],
                    new_requests=[NewRequest("direct", prompt, SamplingOptions(temperature=0.0))])
    result = asyncio.run(llm.llm_engine.executor.execute_async(plan))
    assert result.sampled == {"direct": hf_greedy(d, prompt, 1)[0][0]}
    asyncio.run(llm.llm_engine.executor.execute_async(StepPlan(finished_ids=["direct"])))
    llm.shutdown()
    wait_for_free_cpus(ray_session)


def test_tp2_async_scheduling_matches_sync_and_hf(checkpoint_dirs, ray_session):
    """async_scheduling at TP=2: the ranks keep a step in flight (execute_pipelined) and
    fill placeholder inputs from rank 0's broadcast tokens; greedy output equals
    transformers', sampled output (seeds, n > 1, penalties) equals the synchronous loop's,
    with chunked prefill, and an abort leaves the rest alone."""
    d = checkpoint_dirs["qwen3"]
    prompts = prompts_of([30, 7, 19], seed=5)
    sampled = [SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=5, ignore_eos=True, logprobs=1),
               SamplingParams(temperature=0.7, seed=9, max_tokens=6, ignore_eos=True,
                              repetition_penalty=1.2, min_tokens=3),
               GREEDY]
    outs = {}
    for mode in (False, True):
        llm = LLM(d, tensor_parallel_size=2, async_scheduling=mode, max_num_batched_tokens=16,
                  block_size=4, **COMMON)
        assert llm.llm_engine.async_scheduling is mode
        greedy = generate(llm, prompts)
        outs[mode] = [[(c.token_ids, c.finish_reason) for c in o.outputs]
                      for o in generate(llm, prompts, sampled)]
        if mode:
            check_hf(d, greedy, prompts)
            engine = llm.llm_engine
            done = abort_one_mid_flight(engine, prompts[:3])
            assert [done["a0"].outputs[0].token_ids] == [greedy[0].outputs[0].token_ids]
            assert engine.block_manager.num_used_blocks == 0
        llm.shutdown()
    assert outs[True] == outs[False]
    wait_for_free_cpus(ray_session)


def test_dummy_weights_are_the_same_model_at_any_tp_size(llama_dir, ray_session):
    """load_format="dummy" draws each full tensor from the seed and its name, so TP=2's
    ranks slice TP=1's model (the multi-GPU correctness runs rely on this); all-reduce
    profiling answers on the ranks."""
    prompts = prompts_of([13, 6], seed=3)
    outs = {}
    for tp in (1, 2):
        llm = LLM(llama_dir, load_format="dummy", tensor_parallel_size=tp, **COMMON)
        outs[tp] = generate(llm, prompts)
        if tp == 2:
            assert llm.llm_engine.executor.profile_all_reduce(4, iters=2) > 0
        else:
            assert llm.llm_engine.executor.profile_all_reduce(4) == 0.0
        llm.shutdown()
    for a, b in zip(outs[1], outs[2]):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        for i, t in enumerate(ca.token_ids):
            assert abs(ca.logprobs[i][t].logprob - cb.logprobs[i][t].logprob) < 1e-4
    wait_for_free_cpus(ray_session)


def test_tp1_on_ray_backend(llama_dir, ray_session):
    llm = LLM(llama_dir, distributed_executor_backend="ray", **COMMON)
    try:  # a failure here must not leave its actor holding the CPUs the next tests wait for
        assert isinstance(llm.llm_engine.executor, ray_executor.RayExecutor)
        prompts = prompts_of([11, 4], seed=2)
        check_hf(llama_dir, generate(llm, prompts), prompts)
    finally:
        llm.shutdown()
    wait_for_free_cpus(ray_session)


def test_invalid_tensor_parallel_size(llama_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide num_attention_heads 4"):
        LLM(llama_dir, tensor_parallel_size=3, **COMMON)

    class Cfg:
        num_attention_heads, num_key_value_heads, intermediate_size = 24, 8, 96

    ray_executor.validate_tensor_parallel(Cfg, 4)
    ray_executor.validate_tensor_parallel(Cfg, 8)
    with pytest.raises(ValueError, match="tensor_parallel_size 6 must divide num_key_value_heads 8"):
        ray_executor.validate_tensor_parallel(Cfg, 6)
    Cfg.num_key_value_heads = 3
    ray_executor.validate_tensor_parallel(Cfg, 6)  # each kv head on two ranks
    with pytest.raises(ValueError, match="multiple of num_key_value_heads 3"):
        ray_executor.validate_tensor_parallel(Cfg, 4)


def test_unplaceable_group_names_bundles(llama_dir, ray_session, monkeypatch):
    monkeypatch.setattr(ray_executor, "PLACEMENT_TIMEOUT_S", 1.0)
    with pytest.raises(RuntimeError, match=r"could not place 2 worker\(s\) of \{'CPU': 4\}.*available"):
        LLM(llama_dir, tensor_parallel_size=2, num_cpus_per_worker=4, **COMMON)
    wait_for_free_cpus(ray_session)


def test_unplaceable_core_group_names_its_bundles_and_leaves_nothing(llama_dir, ray_session, monkeypatch):
    """The Serve app's cores (router_deployment.launch_cores / wait_cores): a group whose
    ranks cannot be placed raises naming the bundle and the TP size; its core actor and
    placement group are gone after."""
    from ray.util import placement_group_table

    from raylm.cluster.router_deployment import launch_cores, wait_cores
    from raylm.engine.config import EngineArgs

    monkeypatch.setattr(ray_executor, "PLACEMENT_TIMEOUT_S", 1.0)
    args = EngineArgs(model=llama_dir, tensor_parallel_size=2, num_cpus_per_worker=4, device="cpu", **COMMON)
    actors, groups = launch_cores(args, 1)
    with pytest.raises(RuntimeError, match=r"could not place 1 of 1 worker group\(s\) of 2 x \{'CPU': 4"
                                           r".*tensor_parallel_size=2, num_cpus_per_worker=4"):
        wait_cores(actors, groups, args)
    assert placement_group_table(groups[0])["state"] == "REMOVED"
    wait_for_free_cpus(ray_session)


def test_worker_error_reaches_the_caller(llama_dir, tmp_path, ray_session):
    # Config and tokenizer but no weights: each rank fails while loading.
    d = tmp_path / "noweights"
    shutil.copytree(llama_dir, d, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(Exception, match="has no .safetensors weights"):
        LLM(str(d), tensor_parallel_size=2, **COMMON)
    assert not os.path.exists(d / "model.safetensors")
    wait_for_free_cpus(ray_session)
