"""kv_cache_dtype="fp8": the paged KV cache in float8_e4m3fn with per-layer k/v scales.

Both backends' write/read round trip against a plain quantize-dequantize reference (the
Triton kernels under the interpreter without a GPU); the engine on the llama test
checkpoint against transformers with its K/V rounded through e4m3 the same way; greedy
text against the float32 cache; bytes per block; the argument's validation."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from raylm import LLM, SamplingParams  # noqa: E402
from raylm.engine.config import EngineArgs  # noqa: E402
from raylm.workers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from raylm.workers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from raylm.workers.layers.attention import Attention  # noqa: E402
from tests.helpers import make_tokenizer  # noqa: E402
from tests.test_attention_backends import make_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# Engine vs transformers, both float32 over the same e4m3 K/V: the chosen tokens' logprobs
# differ by at most 2.4e-6 (measured; float32 summation order), so 1e-4, the float32
# tolerance of the transformers oracle tests, has 40x headroom. The fp8 cache itself moves
# those logprobs by 0.06-0.23 nats against a float32 cache (asserted below to exceed 10x
# the tolerance), so the comparison cannot pass on an unquantized cache.
LOGPROB_TOL = 1e-4
# On this random-weight checkpoint the greedy top-2 margins are often below 0.1 nats, so an
# fp8 shift of ~0.2 nats flips near-ties: a divergence from the float32 cache must happen
# at a margin under this (measured: 0.04-0.15), never at a confident token.
NEAR_TIE_NATS = 0.5


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain reference: clamp(x / scale, +-448) -> e4m3 -> float32 * scale."""
    return (x.float() / scale).clamp(-448, 448).to(FP8).float() * scale


def reference_attention(q, k_all, v_all, seqs, scale):
    """Causal attention per sequence over float32 K/V [seq_len, Hk, D] lists."""
    outs, row = [], 0
    group = q.shape[1] // k_all[0].shape[1]
    for (cached, new), k, v in zip(seqs, k_all, v_all):
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[row:row + new].float(), k) * scale
        qpos = torch.arange(cached, cached + new)[:, None]
        s.masked_fill_(torch.arange(cached + new)[None, :] > qpos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        row += new
    return torch.cat(outs)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.02, 3.0)], ids=["unit", "calibrated"])
@pytest.mark.parametrize("seqs", [[(20, 1), (37, 13), (0, 9)], [(20, 1), (70, 1), (0, 1)]],
                         ids=["mixed", "decode"])
@pytest.mark.parametrize("backend_cls", [TorchAttentionBackend, TritonAttentionBackend],
                         ids=["torch", "triton"])
def test_fp8_round_trip(backend_cls, seqs, scales):
    """Fresh tokens written into an fp8 cache whose prefix already holds fp8 tokens: the
    stored bytes equal the plain quantization exactly, the attention output equals
    attention over the quantize-dequantized K/V."""
    k_scale, v_scale = scales
    gen = torch.Generator().manual_seed(len(seqs))
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 16, 24
    meta = make_step(seqs, block_size, num_blocks, gen)
    total = [c + n for c, n in seqs]
    k_all = [3 * torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in total]
    v_all = [3 * torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in total]
    # Saturation, e4m3 rounding midpoints (ties to even: 1.0625 -> 1, 1.1875 -> 1.25),
    # subnormals and a half-subnormal tie (2**-10 -> 0), in units of the scale.
    special = torch.tensor([1e4, -1e4, 1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10,
                            2.0 ** -8 + 2.0 ** -10])
    k_all[0][-1, 0, :len(special)] = special * k_scale
    v_all[0][-1, 1, :len(special)] = special * v_scale
    # The cache starts with the cached prefixes (already quantized), garbage elsewhere.
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(FP8)
    tables = meta.block_tables.cpu()
    for i, (cached, _) in enumerate(seqs):
        for p in range(cached):
            b, o = tables[i, p // block_size], p % block_size
            cache[0, b, o] = (k_all[i][p] / k_scale).clamp(-448, 448).to(FP8)
            cache[1, b, o] = (v_all[i][p] / v_scale).clamp(-448, 448).to(FP8)
    k_new = torch.cat([k[c:] for (c, _), k in zip(seqs, k_all)]).to(DEVICE)
    v_new = torch.cat([v[c:] for (c, _), v in zip(seqs, v_all)]).to(DEVICE)
    q = torch.randn(k_new.shape[0], num_heads, head_dim, generator=gen).to(DEVICE)

    layer = Attention(num_heads, head_dim, num_kv_heads, head_dim ** -0.5)
    layer.k_scale, layer.v_scale = k_scale, v_scale
    layer.kv_cache = cache.to(DEVICE)
    out = layer(q, k_new, v_new, meta, backend_cls()).view(q.shape)

    expected = cache.clone().view(2, -1, num_kv_heads, head_dim)
    slots = meta.slot_mapping.cpu()
    expected[0, slots] = (k_new.cpu() / k_scale).clamp(-448, 448).to(FP8)
    expected[1, slots] = (v_new.cpu() / v_scale).clamp(-448, 448).to(FP8)
    assert torch.equal(layer.kv_cache.cpu().view(torch.uint8), expected.view(cache.shape).view(torch.uint8))
    p = total[0] - 1
    stored = layer.kv_cache[0, tables[0, p // block_size], p % block_size, 0, :len(special)]
    assert stored.float().cpu().tolist() == [448, -448, 1, 1.25, -1, 0, 2.0 ** -8, 2.0 ** -8]
    ref = reference_attention(q.cpu(), [fake_quant(k, k_scale) for k in k_all],
                              [fake_quant(v, v_scale) for v in v_all], seqs, head_dim ** -0.5)
    tol = 1e-2 if DEVICE == "cuda" else 1e-4
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)


# ---- the engine ------------------------------------------------------------------------
def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, fake_quant(key, 1.0), fake_quant(value, 1.0),
                                           attention_mask, **kwargs)


def hf_fp8_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """transformers in float32 with every K/V rounded through e4m3 (scale 1.0) before
    attention: log-softmax at every position of `ids`."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("raylm_fp8_kv", _fp8_kv_attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="raylm_fp8_kv").eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def prompts(n_tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = len(make_tokenizer())
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in n_tokens]


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
PROMPTS = prompts([3, 17, 40, 9, 64, 25], seed=0)


@pytest.fixture(scope="module")
def fp8_and_fp32_runs(llama_dir):
    """{"fp8" / "auto" / "fp8-triton": (outputs, KV bytes per block)} on the same prompts;
    max_num_batched_tokens=32 chunks the long prompts, block_size=8 spans blocks. "fp8-triton"
    runs the Triton kernels under the interpreter (tests/gpu covers them compiled)."""
    runs = {}
    for name in ("fp8", "auto") + (() if DEVICE == "cuda" else ("fp8-triton",)):
        kv, backend = name.split("-")[0], ("triton" if name.endswith("triton") else "torch")
        llm = LLM(llama_dir, dtype="float32", max_model_len=128, block_size=8, max_num_batched_tokens=32,
                  kv_cache_dtype=kv, attention_backend=backend, device="cpu")
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        runs[name] = (outs, llm.llm_engine.executor.kv_bytes_per_block())
        if kv == "fp8":
            runner = llm.llm_engine.executor.runner
            assert all(c.dtype == FP8 for c in runner.kv_caches)
        llm.shutdown()
    return runs


def _chosen_logprobs(out):
    comp = out.outputs[0]
    return comp.token_ids, [comp.logprobs[i][t].logprob for i, t in enumerate(comp.token_ids)]


def test_engine_fp8_logprobs_match_fp8_reference(llama_dir, fp8_and_fp32_runs):
    fp8_outs = fp8_and_fp32_runs["fp8"][0]
    fp32_outs = fp8_and_fp32_runs["auto"][0]
    worst, fp8_effect = 0.0, 0.0
    for prompt, out, out32 in zip(PROMPTS, fp8_outs, fp32_outs):
        tokens, lps = _chosen_logprobs(out)
        # Teacher-forced on the engine's own tokens, so one flipped argmax cannot cascade.
        ref = hf_fp8_logprobs(llama_dir, prompt + tokens)
        ref_lps = [float(ref[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, ref_lps)))
        tokens32, lps32 = _chosen_logprobs(out32)
        if tokens32 == tokens:
            fp8_effect = max(fp8_effect, max(abs(a - b) for a, b in zip(lps, lps32)))
    assert worst < LOGPROB_TOL, worst
    # The test has teeth: the fp8 cache moves logprobs by far more than the tolerance.
    assert fp8_effect > 10 * LOGPROB_TOL, fp8_effect


def test_engine_fp8_triton_matches_torch(fp8_and_fp32_runs):
    """The Triton write / prefill / decode kernels in the engine read the same fp8 cache."""
    if "fp8-triton" not in fp8_and_fp32_runs:
        pytest.skip("compiled Triton on CUDA: tests/gpu/test_kv_cache_fp8_gpu.py")
    for a, b in zip(fp8_and_fp32_runs["fp8"][0], fp8_and_fp32_runs["fp8-triton"][0]):
        (ta, la), (tb, lb) = _chosen_logprobs(a), _chosen_logprobs(b)
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < LOGPROB_TOL


def test_engine_fp8_greedy_matches_fp32_cache(fp8_and_fp32_runs):
    """The first greedy token matches the float32 cache's on most prompts (all six here);
    later tokens may flip only where float32's top-2 margin is a near-tie."""
    fp8 = [o.outputs[0].token_ids for o in fp8_and_fp32_runs["fp8"][0]]
    fp32_outs = fp8_and_fp32_runs["auto"][0]
    fp32 = [o.outputs[0].token_ids for o in fp32_outs]
    assert sum(a[0] == b[0] for a, b in zip(fp8, fp32)) >= len(PROMPTS) - 1, (fp8, fp32)
    assert any(a == b for a, b in zip(fp8, fp32))
    for a, b, out in zip(fp8, fp32, fp32_outs):
        if a != b:
            i = next(i for i in range(len(a)) if a[i] != b[i])
            top = sorted((lp.logprob for lp in out.outputs[0].logprobs[i].values()), reverse=True)
            assert top[0] - top[1] < NEAR_TIE_NATS, (i, top)


def test_kv_bytes_per_block_and_pool(llama_dir, fp8_and_fp32_runs):
    fp8_bytes, fp32_bytes = fp8_and_fp32_runs["fp8"][1], fp8_and_fp32_runs["auto"][1]
    # 2 (K, V) x 2 layers x block_size 8 x 2 kv heads x head_dim 16 elements.
    assert fp8_bytes == 2 * 2 * 8 * 2 * 16 * 1
    assert fp32_bytes == 4 * fp8_bytes
    from transformers import AutoConfig

    from raylm.workers.model_runner import ModelRunner

    hf_config = AutoConfig.from_pretrained(llama_dir)
    bf16 = ModelRunner(llama_dir, hf_config, torch.bfloat16, "cpu", 8, load_format="dummy")
    fp8 = ModelRunner(llama_dir, hf_config, torch.bfloat16, "cpu", 8, load_format="dummy",
                      kv_cache_dtype="fp8_e4m3")
    assert bf16.kv_bytes_per_block() == 2 * fp8.kv_bytes_per_block() == 2 * fp8_bytes
    # The same KV memory holds twice the blocks.
    budget = 64 * bf16.kv_bytes_per_block()
    assert budget // fp8.kv_bytes_per_block() == 2 * (budget // bf16.kv_bytes_per_block())


@pytest.mark.parametrize("bad", ["fp16", "int8", "fp8_e5m2", ""])
def test_bad_kv_cache_dtype_names_the_argument(bad):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype=bad)
