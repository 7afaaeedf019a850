"""The seeded-noise kernel (raylm.kernels.sampling) against its Philox reference, and the
sampler's batched path for seeded rows (CUDA's; forced here on the CPU, with Triton's
interpreter on, one test at a time, so other files keep the CPU's generator draws): a
row depends only on its key, the noise is Exp(1), a seeded request's token is the same
alone and in any batch, and one-hot speculative verification still gives what plain
decoding gives."""
from __future__ import annotations

import math
import random

import pytest
import torch

from raylm.kernels import sampling
from raylm.kernels.interpret import use_interpreter
from raylm.workers import sampler
from raylm.workers.draft_runner import _DRAFT_SALT, draft_sample
from raylm.workers.messages import SamplingOptions
from raylm.workers.sampler import SamplingState, batched_seeded_noise, draw_seed, sample
from tests import test_spec_decode_verify as verify_tests

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KEYS = [0, 1, 2 ** 63, 2 ** 64 - 1, 2 ** 63 - 1, draw_seed(5, 3), draw_seed(-3, 0), 12345]


@pytest.fixture
def kernel_path(monkeypatch):
    """The batched path on this test's device: on the CPU, forced and with Triton's
    interpreter on (so the kernel's numbers), until the test ends."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(sampler, "BATCHED_ON_CPU", True)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        use_interpreter()
    assert batched_seeded_noise(DEVICE) and sampling.runs_kernel(DEVICE)


def state(options: SamplingOptions, num_sampled: int = 0) -> SamplingState:
    st = SamplingState.of_request([1, 2, 3], options, DEVICE)
    st.num_sampled = num_sampled
    return st


def test_kernel_equals_the_reference(kernel_path):
    vocab = 3001  # not a multiple of the block: masked tail
    u = sampling.seeded_uniform(KEYS, vocab, DEVICE).cpu()
    assert torch.equal(u, sampling.seeded_uniform_reference(KEYS, vocab))
    assert (u >= 0).all() and (u < 1).all()
    noise = sampling.seeded_exponential(KEYS, vocab, DEVICE).cpu()
    torch.testing.assert_close(noise, sampling.seeded_exponential_reference(KEYS, vocab), rtol=1e-6, atol=0)
    assert torch.isfinite(noise).all() and (noise >= 0).all()
    # Counters past 0: the same stream, shifted.
    tail = sampling.seeded_uniform(KEYS, 3, DEVICE, counter=vocab - 2).cpu()
    assert torch.equal(tail[:, :2], u[:, -2:])
    assert torch.equal(tail, sampling.seeded_uniform_reference(KEYS, 3, counter=vocab - 2))
    with pytest.raises(ValueError, match="key is -1"):
        sampling.seeded_uniform([-1], 4, DEVICE)


def test_noise_is_log1p_accurate_and_never_zero(kernel_path):
    u = sampling.seeded_uniform(KEYS, 4000, DEVICE).double().cpu()
    noise = sampling.seeded_exponential(KEYS, 4000, DEVICE).double().cpu()
    exact = -torch.log1p(-u)
    assert ((noise - exact).abs() / exact).max() < 1e-6
    # Key 11's uniform at counter 858091 is 5.1e-9: 1 - u rounds to 1 in float32, and
    # -log(1 - u) would be 0 (found by searching the reference).
    u = sampling.seeded_uniform([11], 1, DEVICE, counter=858091).item()
    assert 0 < u < 2 ** -25 and 1 - torch.tensor(u) == 1
    noise = sampling.seeded_exponential([11], 1, DEVICE, counter=858091).item()
    assert noise == pytest.approx(u, rel=1e-6)
    assert sampling.seeded_exponential_reference([11], 1, counter=858091).item() == pytest.approx(u, rel=1e-6)


def test_a_row_depends_only_on_its_key(kernel_path):
    vocab = 1000
    full = sampling.seeded_exponential(KEYS, vocab, DEVICE)
    order = random.Random(0).sample(range(len(KEYS)), len(KEYS))
    assert torch.equal(sampling.seeded_exponential([KEYS[i] for i in order], vocab, DEVICE), full[order])
    assert torch.equal(sampling.seeded_exponential(KEYS[3:4], vocab, DEVICE), full[3:4])
    assert len({tuple(r) for r in full.tolist()}) == len(KEYS)


def test_noise_is_exponential(kernel_path):
    keys = [draw_seed(7, p) for p in range(4)]  # consecutive positions of one request
    noise = sampling.seeded_exponential(keys, 5000, DEVICE).cpu().double()
    x = noise.flatten().sort().values
    n = x.numel()
    assert abs(x.mean().item() - 1) < 0.03 and abs(x.var().item() - 1) < 0.08
    # Kolmogorov-Smirnov against 1 - exp(-x): 1.95 / sqrt(n) is the 0.001 critical value.
    cdf = 1 - torch.exp(-x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.95 / math.sqrt(n), d
    corr = torch.corrcoef(noise)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 0.06


def test_seeded_rows_are_the_same_alone_and_in_any_batch(kernel_path):
    vocab = 2000
    logits = (torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(DEVICE)
    options = [SamplingOptions(temperature=0.9, top_p=0.9, seed=5),
               SamplingOptions(temperature=1.0),  # unseeded
               SamplingOptions(temperature=1.0, top_k=50, seed=7),
               SamplingOptions(temperature=0.0, seed=3),  # greedy
               SamplingOptions(temperature=0.7, seed=-3, presence_penalty=0.5),
               SamplingOptions(temperature=1.2, seed=2 ** 64 - 1)]
    states = [state(o, num_sampled=3 + i) for i, o in enumerate(options)]
    full = sample(logits, states, torch.Generator(DEVICE).manual_seed(1)).tolist()
    seeded = [0, 2, 4, 5]
    for i in seeded:
        assert sample(logits[i:i + 1], [states[i]]).tolist() == [full[i]]
        order = random.Random(i).sample([j for j in range(6) if j != i], 5) + [i]
        again = sample(logits[order], [states[j] for j in order], torch.Generator(DEVICE).manual_seed(9))
        assert again[-1].item() == full[i]
    assert full[3] == logits[3].argmax().item()
    # The draw is the kernel's: on flat logits the token is the reference noise's argmin.
    flat = torch.zeros(1, vocab, device=DEVICE)
    for p in range(3):
        want = sampling.seeded_uniform_reference([draw_seed(5, p)], vocab).argmin().item()
        assert sample(flat, [state(SamplingOptions(temperature=1.0, seed=5), p)]).item() == want


def test_draft_draws_are_keyed_by_seed_and_position(kernel_path):
    vocab = 1000
    flat = torch.zeros(3, vocab, device=DEVICE)
    states = [state(SamplingOptions(temperature=1.0, seed=4)), state(SamplingOptions(temperature=1.0)),
              state(SamplingOptions(temperature=1.0, seed=9))]
    tokens, _ = draft_sample(flat, states, [6, 6, 2])
    for i, seed, pos in [(0, 4, 6), (2, 9, 2)]:
        want = sampling.seeded_uniform_reference([draw_seed(seed ^ _DRAFT_SALT, pos)], vocab).argmin().item()
        assert tokens[i].item() == want
        assert draft_sample(flat[:1], [states[i]], [pos])[0].item() == want


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the verification tests build their logits on the CPU")
def test_verification_is_exact_on_the_batched_path(kernel_path):
    verify_tests.test_one_hot_verification_equals_plain_decoding(1)
    verify_tests.test_seeded_verification_does_not_depend_on_the_batch()
