"""The mixed-step graphs' padded pass (raylm/workers/mixed_graphs.MixedGraphs) on CPU: the
Triton kernels under the interpreter, float32, the pass run eagerly where a GPU would
replay its graph. Padding a mixed step of n tokens over m sequences to T rows and S
sequence slots (a padding sequence reading block 0 and writing nothing, then empty ones)
must leave the real rows exactly as the unpadded step computes them: several prompts at
once, chunked prefill beside decodes, a prefix-cache hit, seeded sampling and logprobs.
tests/gpu/test_engine_gpu.py checks the captured graphs in bf16."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm import LLM, SamplingParams  # noqa: E402
from raylm.workers.cuda_graphs import HostBlockTables  # noqa: E402
from raylm.workers.mixed_graphs import MixedGraphs, mixed_graph_sizes  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the captured graphs (tests/gpu)")


def test_mixed_graph_sizes():
    assert mixed_graph_sizes(2048) == [128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048]
    assert mixed_graph_sizes(300) == [128, 256]
    assert mixed_graph_sizes(100) == []


def _run(llama_dir, prompts, params, padded: bool, chunk: int):
    llm = LLM(llama_dir, dtype="float32", max_model_len=128, block_size=8, attention_backend="triton",
              device="cpu", max_num_batched_tokens=chunk, max_num_seqs=8)
    runner = llm.llm_engine.executor.runner
    calls = []
    if padded:
        max_blocks = -(-runner.max_model_len // runner.block_size)
        runner.host_tables = HostBlockTables(runner.max_num_seqs, max_blocks)
        graphs = MixedGraphs(runner.model, runner.backend, runner.device, runner.max_num_seqs, 256,
                             max_blocks, runner.block_size)
        run = graphs.run
        graphs.run = lambda t, ids, pos, slots, qs, lens, *a, **k: (
            calls.append((t, len(ids), len(lens))) or run(t, ids, pos, slots, qs, lens, *a, **k))
        runner.mixed_graphs = graphs
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.shutdown()
    return outs, calls


def test_padded_mixed_steps_equal_unpadded(llama_dir):
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, 200, (90,), generator=gen).tolist()
    # Lengths that make chunked prefills share steps with decodes; the last hits the prefix cache.
    prompts = [base[:5], base[:40], base[:90], torch.randint(3, 200, (60,), generator=gen).tolist(),
               base[:48] + [11, 12, 13]]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=7, max_tokens=5, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0)]
    ref, _ = _run(llama_dir, prompts, params, padded=False, chunk=32)
    got, calls = _run(llama_dir, prompts, params, padded=True, chunk=32)
    assert calls and all(t == 128 for t, _, _ in calls), calls
    assert any(m > 1 and n < t for t, n, m in calls), calls  # padded steps of several sequences
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or []):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < 1e-4
        if a.prompt_logprobs is not None:
            for da, db, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
                assert abs(da[t].logprob - db[t].logprob) < 1e-4
