"""kv_cache_dtype="fp8" on a GPU: the compiled Triton kernels write the same e4m3 bytes as
the PyTorch backend and read them back alike (bfloat16 queries), and the engine in
bfloat16 with an fp8 cache runs eager and with CUDA graphs to the same tokens, at half the
KV bytes per block of a bfloat16 cache. Skipped without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU (and compiled, not interpreted, Triton)", allow_module_level=True)

from raylm.workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from raylm.workers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from raylm.workers.layers.attention import Attention  # noqa: E402
from tests.test_kv_cache_fp8 import PROMPTS, make_step  # noqa: E402

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.02, 3.0)], ids=["unit", "calibrated"])
@pytest.mark.parametrize("seqs", [[(20, 1), (37, 13), (0, 9)], [(20, 1), (300, 1), (0, 1)]],
                         ids=["mixed", "decode"])
def test_fp8_triton_matches_torch_bf16(seqs, scales):
    """Both backends write the same e4m3 bytes. Read back with bfloat16 queries, the Triton
    kernels are as close to the float32 computation on the same cache (the PyTorch backend
    with float32 q/k/v) as the PyTorch backend's own bfloat16 path is. A direct bf16-to-bf16
    comparison is not a fair check: with the calibrated k scale most new keys saturate at
    448 * 0.02, the scores reach tens of nats, and rounding them in bfloat16 (0.125 apart
    there) moves the softmax of either side by a few percent."""
    gen = torch.Generator().manual_seed(len(seqs))
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 128, 16, 64
    meta = make_step(seqs, block_size, num_blocks, gen)
    n = sum(new for _, new in seqs)
    q, k, v = (3 * torch.randn(n, h, head_dim, generator=gen) for h in (num_heads, num_kv_heads, num_kv_heads))
    q, k, v = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to("cuda", FP8)
    outs, caches = [], []
    runs = ((TorchAttentionBackend(), torch.bfloat16), (TritonAttentionBackend(), torch.bfloat16),
            (TorchAttentionBackend(), torch.float32))  # bf16 values are exact in float32: same bytes
    for backend, dtype in runs:
        layer = Attention(num_heads, head_dim, num_kv_heads, head_dim ** -0.5)
        layer.k_scale, layer.v_scale = scales
        layer.kv_cache = cache.clone()
        outs.append(layer(*(x.to(dtype) for x in (q, k, v)), meta, backend).float())
        caches.append(layer.kv_cache)
    for c in caches[1:]:
        assert torch.equal(caches[0].view(torch.uint8), c.view(torch.uint8))
    torch_bf16, triton_bf16, reference = outs
    torch_err, triton_err = (torch_bf16 - reference).abs(), (triton_bf16 - reference).abs()
    assert triton_err.max() <= max(1.5 * torch_err.max().item(), 2e-2)
    assert triton_err.mean() <= max(1.5 * torch_err.mean().item(), 1e-3)


def test_engine_fp8_bf16_graphs_and_eager(llama_dir):
    from raylm import LLM, SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    results, per_block = {}, {}
    for kv, eager in (("fp8", True), ("fp8", False), ("auto", True)):
        llm = LLM(llama_dir, dtype="bfloat16", max_model_len=128, max_num_seqs=16,
                  gpu_memory_utilization=0.3, enforce_eager=eager, kv_cache_dtype=kv)
        runner = llm.llm_engine.executor.runner
        assert (runner.graphs is None) == eager
        assert runner.kv_caches[0].dtype == (FP8 if kv == "fp8" else torch.bfloat16)
        per_block[kv] = llm.llm_engine.executor.kv_bytes_per_block()
        results[kv, eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        llm.shutdown()
    assert per_block["auto"] == 2 * per_block["fp8"]
    # Graphs bake the (constant) scales in and run the same kernels: the same tokens,
    # allowing one sequence to part on a near-tie.
    same = sum(a == b for a, b in zip(results["fp8", True], results["fp8", False]))
    assert same >= len(PROMPTS) - 1
    first = sum(a[0] == b[0] for a, b in zip(results["fp8", True], results["auto", True]))
    assert first >= len(PROMPTS) - 1
