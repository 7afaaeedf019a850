"""The engine on a GPU in bfloat16 against transformers on the same random weights
(Qwen3-0.6B's and Llama-3.1-8B's layouts, shrunk to 4 layers): the first greedy tokens
agree, log-probabilities agree within bf16 tolerance, and CUDA graphs change nothing
against eager. Skipped without a GPU."""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU (and compiled, not interpreted, Triton)", allow_module_level=True)

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "benchmarks", "models")


def _small_config_dir(tmp_path, name: str) -> str:
    src = os.path.join(MODELS, name, "config.json")
    if not os.path.isfile(src):
        pytest.skip(f"{src} is not here")
    cfg = json.load(open(src))
    cfg["num_hidden_layers"] = 4
    d = tmp_path / name
    d.mkdir()
    json.dump(cfg, open(d / "config.json", "w"))
    return str(d)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.1-8b"])
def test_bf16_engine_matches_transformers(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from raylm import LLM, SamplingParams

    cfg_dir = _small_config_dir(tmp_path, name)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 37, 130, 300)]
    steps = 8
    ref_tokens, ref_lp = [], []
    with torch.inference_mode():
        for p in prompts:
            out = hf.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0)
            ref_tokens.append(out.sequences[0, len(p):].tolist())
            ref_lp.append(torch.log_softmax(out.scores[0][0].float(), -1))

    sp = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=1)
    results = {}
    for eager in (True, False):
        llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5, enforce_eager=eager)
        llm.llm_engine.executor.runner.model.load_weights(iter(hf.state_dict().items()))
        assert (llm.llm_engine.executor.runner.graphs is None) == eager
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        results[eager] = outs
        llm.shutdown()
    for eager, outs in results.items():
        first_equal = sum(o.outputs[0].token_ids[0] == r[0] for o, r in zip(outs, ref_tokens))
        assert first_equal >= len(prompts) - 1, (eager, [o.outputs[0].token_ids for o in outs], ref_tokens)
        for o, lp in zip(outs, ref_lp):
            tok = o.outputs[0].token_ids[0]
            assert abs(o.outputs[0].logprobs[0][tok].logprob - lp[tok].item()) < 0.15
    # Graphs and eager run the same kernels (at padded shapes): the same greedy tokens,
    # allowing one sequence to part on a near-tie.
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(results[True], results[False]))
    assert same >= len(prompts) - 1


def test_async_scheduling_matches_sync_and_never_waits(tmp_path):
    """Asynchronous scheduling (the GPU default) gives the synchronous loop's greedy tokens
    with CUDA graphs in bf16, and launching a decode step (placeholders filled on the
    device, sampling with top-p, logprobs) makes no synchronising CUDA call: PyTorch's
    sync debug mode raises on any."""
    from raylm import LLM, SamplingParams

    cfg_dir = _small_config_dir(tmp_path, "qwen3-0.6b")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 37, 130, 300, 64)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    outs = {}
    for mode in (False, True):
        llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5, async_scheduling=mode)
        assert llm.llm_engine.async_scheduling is mode and llm.llm_engine.executor.runner.graphs is not None
        outs[mode] = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        if mode:
            engine = llm.llm_engine
            probe = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True, logprobs=2)
            for i, p in enumerate(prompts):
                engine.add_request(f"probe{i}", {"prompt_token_ids": p}, probe)
            engine.step()  # launches the prefill
            engine.step()  # launches the first decode (placeholders), collects the prefill
            core = engine.core
            plan = core.planner.plan(core.scheduler.schedule())
            assert all(s.token_ids == [-1] for s in plan.seqs)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                engine.executor.launch(plan)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        llm.shutdown()
    for a, b in zip(outs[False], outs[True]):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        assert max(abs(ca.logprobs[i][t].logprob - cb.logprobs[i][t].logprob)
                   for i, t in enumerate(ca.token_ids)) < 1e-3


def test_prefill_graphs_match_eager(tmp_path):
    """One-sequence prefills up to 512 tokens replay a CUDA graph at a padded token count:
    a fresh prompt, a prefix-cache hit (the chunk starts after cached blocks) and chunked
    prefill (64-token chunks) give eager's greedy tokens, and every prompt position's
    logprob within bf16 tolerance (so no padding row leaks into a real one)."""
    from raylm import LLM, SamplingParams

    cfg_dir = _small_config_dir(tmp_path, "llama-3.1-8b")
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(0, 1000, (300,), generator=gen).tolist()
    prompts = [base[:5], base[:130], base, base[:200] + [7, 8, 9]]  # the last hits the prefix cache
    with_prompt_lp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)  # may use the cache
    params = [with_prompt_lp] * 2 + [plain] * 2  # plain requests fill and use the prefix cache
    results, used = {}, {}
    for eager, chunk in ((True, None), (False, None), (False, 64)):
        llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5, enforce_eager=eager,
                  max_num_batched_tokens=chunk)
        runner = llm.llm_engine.executor.runner
        assert (runner.prefill_graphs is None) == eager
        calls = []
        if not eager:
            run = runner.prefill_graphs.run
            runner.prefill_graphs.run = lambda t, ids, start, *a, **k: calls.append((t, len(ids), start)) or run(
                t, ids, start, *a, **k)
        # One request at a time, so every prefill step holds a single sequence.
        results[eager, chunk] = [llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
                                 for p, sp in zip(prompts, params)]
        used[eager, chunk] = calls
        llm.shutdown()
    assert {(t, n) for t, n, _ in used[False, None]} >= {(16, 5), (256, 130), (512, 300)}
    assert any(start > 0 for _, _, start in used[False, None])  # the prefix hit ran in a graph
    assert any(start > 0 and n == 64 for _, n, start in used[False, 64])  # a later chunk did
    ref = results[True, None]
    for key in ((False, None), (False, 64)):
        # The same kernels at padded shapes: the same greedy tokens, allowing one sequence
        # to part on a near-tie.
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ref, results[key]))
        assert same >= len(prompts) - 1, key
        for a, b in zip(ref, results[key]):
            tok = a.outputs[0].token_ids[0]
            assert abs(a.outputs[0].logprobs[0][tok].logprob - b.outputs[0].logprobs[0][tok].logprob) < 0.1
            if a.prompt_logprobs is None:
                continue
            pa = [d[t].logprob for d, t in zip(a.prompt_logprobs[1:], a.prompt_token_ids[1:])]
            pb = [d[t].logprob for d, t in zip(b.prompt_logprobs[1:], b.prompt_token_ids[1:])]
            assert max(abs(x - y) for x, y in zip(pa, pb)) < 0.1, key


def test_mixed_graphs_match_eager(tmp_path, monkeypatch):
    """Mixed steps (decodes beside 64-token prefill chunks of other prompts) replay the
    mixed-step CUDA graph of their padded token count: the same greedy tokens as with
    those graphs off (RAYLM_MIXED_GRAPHS=0, the steps eager), allowing one sequence to part
    on a near-tie, and the first token's logprob within bf16 tolerance."""
    from raylm import LLM, SamplingParams

    cfg_dir = _small_config_dir(tmp_path, "qwen3-0.6b")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 70, 150, 300, 33, 260)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    results, used = {}, {}
    for mixed in ("0", "1"):
        monkeypatch.setenv("RAYLM_MIXED_GRAPHS", mixed)
        llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=0.5, max_num_batched_tokens=64)
        runner = llm.llm_engine.executor.runner
        assert (runner.mixed_graphs is None) == (mixed == "0")
        calls = []
        if mixed == "1":
            run = runner.mixed_graphs.run
            runner.mixed_graphs.run = lambda t, ids, *a, **k: calls.append((t, len(ids))) or run(t, ids, *a, **k)
        results[mixed] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        used[mixed] = calls
        llm.shutdown()
    assert used["1"] and all(t == 128 for t, _ in used["1"]), used["1"]
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(results["0"], results["1"]))
    assert same >= len(prompts) - 1
    for a, b in zip(results["0"], results["1"]):
        tok = a.outputs[0].token_ids[0]
        assert abs(a.outputs[0].logprobs[0][tok].logprob - b.outputs[0].logprobs[0][tok].logprob) < 0.1
