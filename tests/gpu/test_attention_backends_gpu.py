"""Each attention backend (triton, flashinfer, flash_attn) against the PyTorch reference at
the real head layouts of Qwen3-0.6B, Qwen3-8B and Llama-3.1-8B (benchmarks/models/*/
config.json), block sizes 16 and 32 (and 128, FA4's key tile), contexts of 1 to 32k
tokens: decode, prefill, mixed steps and prefix-cache hits, bf16 and fp8 KV caches (a
backend that refuses a shape must say so with a ValueError naming it). Then the engine's
greedy tokens and logprobs with each backend against the Triton backend, eager and with
CUDA graphs. Skipped without CUDA; a backend whose package is missing is skipped."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU (and compiled, not interpreted, Triton)", allow_module_level=True)

from raylm.kernels.attention.kv_cache import quantize_kv  # noqa: E402
from raylm.kernels.attention.prefill import paged_prefill_attention_ref  # noqa: E402
from raylm.workers.attention_backends import AttentionMetadata, get_attention_backend  # noqa: E402

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "benchmarks", "models")
FP8 = torch.float8_e4m3fn
TOL = 2e-2  # bf16 outputs of unit-variance values, float32 reference


def _layout(name: str) -> tuple[int, int, int]:
    cfg = json.load(open(os.path.join(MODELS, name, "config.json")))
    heads = cfg["num_attention_heads"]
    return heads, cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // heads


LAYOUTS = ["qwen3-0.6b", "qwen3-8b", "llama-3.1-8b"]
# (cached tokens, new tokens) per sequence.
STEPS = {
    "decode": [(0, 1), (15, 1), (1000, 1), (8191, 1), (32767, 1)],
    "prefill": [(0, 1), (0, 17), (0, 2048)],
    "mixed": [(20, 1), (5000, 1), (0, 300), (37, 13)],
    "prefix_hit": [(4096, 500), (30000, 1024), (16, 16)],
}


def _backend(name: str):
    try:
        return get_attention_backend(name)
    except ImportError as e:
        pytest.skip(str(e))


def _step(seqs, block_size, gen):
    """Metadata as the model runner builds it, over shuffled blocks of a cache just big enough."""
    need = [-(-(c + n) // block_size) for c, n in seqs]
    perm = torch.randperm(sum(need) + 1, generator=gen).tolist()
    tables, slots, starts = [], [], [0]
    for (cached, new), n in zip(seqs, need):
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        starts.append(starts[-1] + new)
    width = max(need)
    seq_lens = [c + n for c, n in seqs]
    query_lens = [n for _, n in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device="cuda"),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda"),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens))
    return meta, sum(need) + 1


def _check(backend_name, layout, block_size, step, kv_dtype):
    """`layout`: a model's name under benchmarks/models, or (heads, kv heads, head_dim)."""
    backend = _backend(backend_name)
    num_heads, num_kv_heads, head_dim = layout if isinstance(layout, tuple) else _layout(layout)
    gen = torch.Generator().manual_seed(block_size + len(step))
    meta, num_blocks = _step(STEPS[step], block_size, gen)
    t = int(meta.query_start_loc[-1])
    k_scale, v_scale = (0.5, 2.0) if kv_dtype == FP8 else (1.0, 1.0)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device="cuda")
    cache = torch.stack([quantize_kv(cache[0], kv_dtype, k_scale), quantize_kv(cache[1], kv_dtype, v_scale)])
    q, k, v = (torch.randn(t, h, head_dim, device="cuda", dtype=torch.bfloat16)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    scale = head_dim ** -0.5
    try:
        backend.write_kv(k, v, cache, meta.slot_mapping, k_scale, v_scale)
        out = backend.attend(q, cache, meta, scale, k_scale, v_scale)
    except ValueError as e:  # a refused shape names it
        assert f"attention_backend {backend_name!r} cannot run" in str(e) and f"block_size={block_size}" in str(e)
        pytest.skip(str(e))
    ref = paged_prefill_attention_ref(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                      scale, k_scale, v_scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "flashinfer", "flash_attn"])
def test_backend_matches_reference(backend, layout, block_size, step, kv):
    if block_size == 128 and backend != "flash_attn":
        pytest.skip("block_size 128 is FA4's TMA path")
    _check(backend, layout, block_size, step, FP8 if kv == "fp8" else torch.bfloat16)


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_flashinfer_group_without_cuda_core_decode(step, kv):
    """28 query heads over 4 kv heads (Qwen2.5-7B): group 7, for which FlashInfer builds no
    CUDA-core decode kernel, so even an fp8 cache decodes on the tensor-core one."""
    _check("flashinfer", (28, 4, 128), 16, step, FP8 if kv == "fp8" else torch.bfloat16)


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_flashinfer_decode_graph_replanned(kv):
    """A captured 512-row decode (the largest size the graph runner captures; with a bf16
    cache FlashInfer's graph-mode tensor-core split-KV needs 162 MiB of workspace at
    Llama-3.1-8B's heads, the fp8 cache takes the CUDA-core kernel), planned again before
    each replay: all rows, then 300 real rows and 212 padding ones."""
    backend = _backend("flashinfer")
    num_heads, num_kv_heads, head_dim = _layout("llama-3.1-8b")
    kv_dtype = FP8 if kv == "fp8" else torch.bfloat16
    k_scale, v_scale = (0.5, 2.0) if kv == "fp8" else (1.0, 1.0)
    rows, block_size, max_blocks, num_blocks = 512, 16, 64, 4096
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).cuda()
    cache = torch.stack([quantize_kv(cache[0], kv_dtype, k_scale), quantize_kv(cache[1], kv_dtype, v_scale)])
    q = torch.randn(rows, num_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    scale = head_dim ** -0.5
    meta = AttentionMetadata(
        slot_mapping=torch.full((rows,), -1, dtype=torch.long, device="cuda"),
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.ones(rows, dtype=torch.int32, device="cuda"),
        block_tables=torch.zeros(rows, max_blocks, dtype=torch.int32, device="cuda"),
        query_lens_cpu=[1] * rows, seq_lens_cpu=[1] * rows, max_query_len=1,
        max_seq_len=max_blocks * block_size)
    backend.attend(q, cache, meta, scale, k_scale, v_scale)  # eagerly first, as the graph runner
    backend.graph_prepare(meta, max_blocks)
    backend.graph_plan(meta, [1] * rows, [1] * rows)
    backend.attend(q, cache, meta, scale, k_scale, v_scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(q, cache, meta, scale, k_scale, v_scale)
    for n in (rows, 300):
        lens = torch.randint(1, max_blocks * block_size + 1, (n,), generator=gen)
        meta.block_tables[:n] = torch.randint(0, num_blocks, (n, max_blocks), generator=gen).int().cuda()
        meta.seq_lens[:n] = lens.int().cuda()
        meta.seq_lens[n:] = 0
        backend.graph_plan(meta, [1] * n, lens.tolist())
        graph.replay()
        ref = paged_prefill_attention_ref(q[:n], cache, meta.block_tables[:n], meta.seq_lens[:n],
                                          meta.query_start_loc[:n + 1], scale, k_scale, v_scale)
        torch.testing.assert_close(out[:n].float(), ref.float(), atol=TOL, rtol=TOL)


def test_flash_attn_refuses_fp8_cache():
    backend = _backend("flash_attn")
    gen = torch.Generator().manual_seed(0)
    meta, num_blocks = _step([(3, 1)], 16, gen)
    cache = torch.zeros(2, num_blocks, 16, 8, 128, device="cuda", dtype=FP8)
    q = torch.zeros(1, 16, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype=float8_e4m3fn.*no fp8 KV cache"):
        backend.attend(q, cache, meta, 0.1)


def _small_config_dir(tmp_path, name: str) -> str:
    cfg = json.load(open(os.path.join(MODELS, name, "config.json")))
    cfg["num_hidden_layers"] = 4
    d = tmp_path / name
    d.mkdir()
    json.dump(cfg, open(d / "config.json", "w"))
    return str(d)


@pytest.mark.parametrize("backend", ["flashinfer", "flash_attn", "auto"])
def test_engine_matches_triton(tmp_path, monkeypatch, backend):
    """Greedy tokens and their logprobs with `backend` against the Triton backend on the same
    random weights (Qwen3-0.6B's layout, 4 layers): prompts of 5 to 600 tokens, a prefix-cache
    hit, chunked prefill (mixed steps); eager, and with CUDA graphs (decode and one-sequence
    prefill graphs planned before each replay). "auto" gets 12 prompts, so that its decode
    steps are past AUTO_SMALL_DECODE_SEQS, and a long-prefill bound of 100 tokens, so that its
    eager prompt-only steps take "prefill_long" (FlashInfer's, where it is installed)."""
    if backend != "auto":
        _backend(backend)
    else:
        from raylm.workers import attention_backends

        monkeypatch.setattr(attention_backends, "AUTO_LONG_PREFILL_TOKENS", 100)
    from raylm import LLM, SamplingParams

    cfg_dir = _small_config_dir(tmp_path, "qwen3-0.6b")
    gen = torch.Generator().manual_seed(4)
    base = torch.randint(0, 1000, (600,), generator=gen).tolist()
    prompts = [base[:5], base[:130], base, base[:300] + [7, 8, 9]]
    if backend == "auto":  # past AUTO_SMALL_DECODE_SEQS, so decode steps take auto's large-batch rule
        prompts = [p + [i] for i in range(3) for p in prompts]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = {}
    for name in ("triton", backend):
        for eager in (True, False):
            llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                      max_model_len=2048, max_num_seqs=16, gpu_memory_utilization=0.4, enforce_eager=eager,
                      max_num_batched_tokens=256, attention_backend=name)
            assert (llm.llm_engine.executor.runner.graphs is None) == eager
            outs[name, eager] = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            if name == "auto" and eager and importlib.util.find_spec("flashinfer") is not None:
                assert llm.llm_engine.executor.runner.backend.chosen["prefill_long"].name == "flashinfer"
            llm.shutdown()
    for eager in (True, False):
        for a, b in zip(outs["triton", eager], outs[backend, eager]):
            ca, cb = a.outputs[0], b.outputs[0]
            n = next((i for i, (x, y) in enumerate(zip(ca.token_ids, cb.token_ids)) if x != y), len(ca.token_ids))
            assert n >= 4, (eager, ca.token_ids, cb.token_ids)  # a near-tie may part them later
            for i in range(n):
                t = ca.token_ids[i]
                assert abs(ca.logprobs[i][t].logprob - cb.logprobs[i][t].logprob) < 0.1, (eager, i)
