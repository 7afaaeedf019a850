"""The one-sequence prefill graphs' padded pass (raylm/workers/cuda_graphs.PrefillGraphs)
on CPU: the Triton kernels under the interpreter, float32, the pass run eagerly where a GPU
would replay its graph. Padding a prefill of n tokens to T rows (slot -1, positions after
every real query) must leave the real rows exactly as the unpadded step computes them:
fresh prompts, a prefix-cache hit and chunked prefill give the same tokens and the same
prompt logprobs. tests/gpu/test_engine_gpu.py checks the captured graphs in bf16."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm import LLM, SamplingParams  # noqa: E402
from raylm.workers.cuda_graphs import PrefillGraphs, prefill_graph_sizes  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the captured graphs (tests/gpu)")


def test_prefill_graph_sizes():
    assert prefill_graph_sizes(4096) == [16, 32, 64, 128, 256, 512]
    assert prefill_graph_sizes(100) == [16, 32, 64, 100]
    assert prefill_graph_sizes(64) == [16, 32, 64]
    assert prefill_graph_sizes(8) == [8]


def _run(llama_dir, prompts, params, padded: bool, chunk=None):
    llm = LLM(llama_dir, dtype="float32", max_model_len=128, block_size=8, attention_backend="triton",
              device="cpu", max_num_batched_tokens=chunk)
    runner = llm.llm_engine.executor.runner
    calls = []
    if padded:
        graphs = PrefillGraphs(runner.model, runner.backend, runner.device, runner.max_model_len,
                               -(-runner.max_model_len // runner.block_size), runner.block_size)
        run = graphs.run
        graphs.run = lambda t, ids, start, *a, **k: calls.append((t, len(ids), start)) or run(t, ids, start, *a, **k)
        runner.prefill_graphs = graphs
    # One request at a time: every prefill step holds a single sequence.
    outs = [llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    llm.shutdown()
    return outs, calls


@pytest.mark.parametrize("chunk", [None, 16])
def test_padded_prefill_equals_unpadded(llama_dir, chunk):
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, 200, (70,), generator=gen).tolist()
    prompts = [base[:5], base[:40], base, base[:48] + [11, 12, 13]]  # the last hits the prefix cache
    with_prompt_lp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    params = [with_prompt_lp] * 2 + [plain] * 2  # plain requests fill and use the prefix cache
    ref, _ = _run(llama_dir, prompts, params, padded=False, chunk=chunk)
    got, calls = _run(llama_dir, prompts, params, padded=True, chunk=chunk)
    sizes = {(t, n) for t, n, _ in calls}
    if chunk is None:
        assert {(16, 5), (64, 40), (128, 70)} <= sizes
        assert any(start == 48 and n == 3 for _, n, start in calls), calls  # after the cached blocks
    else:
        assert any(start > 0 and n == 16 for _, n, start in calls)  # a later chunk
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < 1e-4
        if a.prompt_logprobs is not None:
            for da, db, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
                assert abs(da[t].logprob - db[t].logprob) < 1e-4
