"""The sampler's top-k / top-p masks on a GPU (torch.topk's candidates and the sort-free
kernel, as CUDA runs them) equal the definition's, at Qwen3's vocabulary and a full batch: exactly
for top-k, and up to the one token at the top-p boundary where the GPU's softmax rounds
differently from the CPU's. The seeded-noise kernel compiled for the GPU equals its CPU
reference, and seeded rows sample the same in any batch. Skipped without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from raylm.kernels.sampling import (seeded_exponential, seeded_exponential_reference,  # noqa: E402
                                    seeded_uniform, seeded_uniform_reference, top_k_top_p_filter,
                                    top_k_top_p_filter_reference)
from raylm.workers.messages import SamplingOptions  # noqa: E402
from raylm.workers.sampler import SamplingState, _top_k_top_p, draw_seed, sample  # noqa: E402
from tests.test_sampler_filters import reference  # noqa: E402


@pytest.mark.parametrize("top_k,top_p", [(20, 0.95), (0, 0.9), (50, 1.0), (2000, 0.8)])
def test_masks_on_the_gpu_equal_the_definition(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(256, 151936, generator=g) * 3
    rows = [0, 1, 2, 255]  # the definition runs row by row on the CPU: a few rows suffice
    got = _top_k_top_p(logits.cuda(), [top_k] * 256, [top_p] * 256)[rows].cpu()
    want = reference(logits[rows], [top_k] * len(rows), [top_p] * len(rows))
    differ = (torch.isinf(got) != torch.isinf(want)).sum(dim=1)
    assert (differ == 0).all() if top_p == 1.0 else (differ <= 1).all(), differ


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (2000, 0.8), (20, 0.95), (50, 1.0), (0, 0.999), (1, 0.5)])
def test_sort_free_kernel_equals_the_sort_on_the_gpu(top_k, top_p):
    """Every row of a full batch at Llama 3's vocabulary, with per-row settings mixed in
    (rows without a filter, masked tokens): the compiled kernel's masks equal one sort's,
    up to the tokens at the top-p boundary that two summation orders place on either side
    (one token, or at p near 1 a few of the least likely: their mass is what is checked),
    and keep the logits."""
    g = torch.Generator().manual_seed(7 + top_k)
    logits = (torch.randn(256, 128256, generator=g) * 3).cuda()
    logits[3, :60000] = float("-inf")
    logits[4] = logits[4].round()  # tied levels
    ks = [top_k] * 256
    ps = [top_p] * 256
    ks[5], ps[5] = 0, 1.0  # a row left alone
    got = top_k_top_p_filter(logits, ks, ps)
    want = top_k_top_p_filter_reference(logits, ks, ps)
    differ = torch.isinf(got) != torch.isinf(want)
    if top_p == 1.0:
        assert not differ.any()
    else:
        after_k = top_k_top_p_filter_reference(logits, ks, [1.0] * 256).softmax(dim=1)
        mass = (after_k * differ).sum(dim=1)
        assert (mass <= 1e-4).all(), mass.max()
        assert (differ.sum(dim=1) <= 1).all() or top_p > 0.99, differ.sum(dim=1)
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept]) and kept[5].all()


def _flashinfer():
    try:
        import flashinfer.sampling as fi
    except ImportError:
        pytest.skip("needs flashinfer")
    return fi


def test_flashinfer_draws_from_our_filtered_distribution(monkeypatch):
    """Where FlashInfer draws (unseeded rows asking top-k or top-p), every drawn token is
    one our filter keeps, and over many draws of a small vocabulary the frequencies match
    the filtered softmax; a seeded batch stays on our draw, token for token."""
    from raylm.workers import sampler
    _flashinfer()
    monkeypatch.delenv("RAYLM_USE_FLASHINFER_SAMPLER", raising=False)
    assert sampler.flashinfer_sampling(torch.device("cuda")) is not None
    logits = (torch.randn(256, 128256, generator=torch.Generator().manual_seed(5)) * 3).cuda()
    options = [SamplingOptions(temperature=0.6, top_p=0.9) if i % 2 else
               SamplingOptions(temperature=0.8, top_k=20, top_p=0.95) for i in range(256)]
    states = [SamplingState.of_request([1], o, torch.device("cuda")) for o in options]
    calls = []
    real = sampler._flashinfer_draw
    monkeypatch.setattr(sampler, "_flashinfer_draw", lambda *a: calls.append(1) or real(*a))
    got = sample(logits, states, torch.Generator("cuda").manual_seed(0))
    assert calls
    temps = torch.tensor([o.temperature for o in options], device="cuda").unsqueeze(1)
    kept = ~torch.isinf(top_k_top_p_filter_reference(logits / temps, [o.top_k for o in options],
                                                     [o.top_p for o in options]))
    assert kept.gather(1, got.view(-1, 1)).all()

    small = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0]], device="cuda").repeat(4096, 1)
    st = [SamplingState.of_request([1], SamplingOptions(temperature=1.0, top_p=0.8), torch.device("cuda"))] * 4096
    draws = torch.cat([sample(small, st) for _ in range(8)])
    want = top_k_top_p_filter_reference(small[:1], [0], [0.8]).softmax(dim=1)[0]
    freq = torch.bincount(draws, minlength=8).float() / draws.numel()
    assert (freq[want == 0] == 0).all()
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)

    seeded = [SamplingState.of_request([1], SamplingOptions(temperature=0.6, top_p=0.9, seed=i),
                                       torch.device("cuda")) for i in range(16)]
    with_fi = sample(logits[:16], seeded).tolist()
    monkeypatch.setenv("RAYLM_USE_FLASHINFER_SAMPLER", "0")
    assert sampler.flashinfer_sampling(torch.device("cuda")) is None
    assert sample(logits[:16], seeded).tolist() == with_fi


def _seeded_keys(n: int) -> list[int]:
    return [0, 2 ** 64 - 1, 2 ** 63] + [draw_seed(s, 17 * s) for s in range(n - 3)]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")
def test_seeded_noise_kernel_equals_the_reference():
    keys, vocab = _seeded_keys(256), 151936
    u = seeded_uniform(keys, vocab, "cuda").cpu()
    assert torch.equal(u, seeded_uniform_reference(keys, vocab))
    noise = seeded_exponential(keys, vocab, "cuda").cpu()
    torch.testing.assert_close(noise, seeded_exponential_reference(keys, vocab), rtol=1e-5, atol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")
def test_seeded_rows_are_batch_independent_on_the_gpu():
    vocab, n = 151936, 64
    logits = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(3)) * 3).cuda()
    options = [SamplingOptions(temperature=0.8, top_k=20, top_p=0.95, seed=i) if i % 3 else
               SamplingOptions(temperature=1.0 if i % 2 else 0.0) for i in range(n)]
    states = [SamplingState.of_request([1, 2], o, torch.device("cuda")) for o in options]
    full = sample(logits, states, torch.Generator("cuda").manual_seed(0)).tolist()
    seeded = [i for i in range(n) if i % 3]
    order = list(reversed(range(n)))
    again = sample(logits[order], [states[i] for i in order], torch.Generator("cuda").manual_seed(1)).tolist()
    alone = sample(logits[seeded], [states[i] for i in seeded]).tolist()
    assert [again[n - 1 - i] for i in seeded] == [full[i] for i in seeded] == alone
