"""Top-k and top-p masks (`sampler._top_k_top_p`) against the plain definition: top-k
keeps every token at least as likely as the k-th, top-p the smallest set of the most
likely remaining tokens whose probability reaches p, and every token as likely as its
least likely one (ties at either threshold stay), rows independent of each other. Its
three ways (torch.topk's candidates when every row has a small k; otherwise the Triton
kernel that searches the thresholds without a sort, here under Triton's interpreter, as
CUDA runs it; or the CPU's sort) give the definition's masks, with masked (-inf) logits and
with ties at the thresholds."""
from __future__ import annotations

import pytest
import torch

from raylm.kernels import sampling as ks
from raylm.kernels.interpret import use_interpreter
from raylm.workers import sampler
from raylm.workers.sampler import _top_k_top_p

INF = float("-inf")


def reference(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Row by row, from the definition (two sorts)."""
    out = logits.clone()
    vocab = logits.shape[1]
    for r in range(logits.shape[0]):
        row = out[r]
        k = top_k[r]
        if 0 < k < vocab:
            kth = row.sort(descending=True).values[k - 1]
            row[row < kth] = INF
        p = top_p[r]
        if p < 1.0:
            probs = row.softmax(dim=0)
            sorted_probs, idx = probs.sort(descending=True)
            before = sorted_probs.cumsum(dim=0) - sorted_probs  # mass of the more likely tokens
            kept = idx[before < p]
            row[row < row[kept].min()] = INF
    return out


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[0, :vocab // 2] = INF  # a row with masked tokens (a grammar, logit_bias)
    logits[1, 5:9] = logits[1].max()  # ties at the top, so at a small k-th value
    logits[2, 10:30] = 0.25  # a tied plateau inside the candidates
    return logits


@pytest.mark.parametrize("top_k,top_p", [
    ([20, 5, 1, 50, 20, 7], [0.95, 1.0, 0.5, 0.9, 1.0, 0.3]),  # every row small k: topk's candidates
    ([0, 5, -1, 2000, 20, 7], [0.9, 0.8, 1.0, 0.9, 1.0, 0.99]),  # some rows without k: a sort
    ([0, 0, 0, 0, 0, 0], [0.9, 0.5, 1.0, 0.1, 0.99, 0.7]),  # top-p alone
    ([3, 3, 3, 3, 3, 3], [1.0] * 6),  # top-k alone
])
@pytest.mark.parametrize("way", ["sort", "kernel"])
def test_masks_equal_the_definition(top_k, top_p, way, monkeypatch):
    """`way` is how rows with a large k or none are filtered: the Triton kernel (under the
    interpreter, as CUDA runs it) or the CPU's sort."""
    if way == "kernel":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        use_interpreter()
        monkeypatch.setattr(sampler, "FILTER_KERNEL_ON_CPU", True)
    calls = []
    monkeypatch.setattr(sampler, "top_k_top_p_filter", lambda *a: calls.append(1) or ks.top_k_top_p_filter(*a))
    logits = random_logits(len(top_k), 4096, seed=sum(top_k))
    got = _top_k_top_p(logits, top_k, top_p)
    assert bool(calls) == (way == "kernel" and max(k if 0 < k < 4096 else 4096 for k in top_k) > 1024)
    want = reference(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept])  # kept logits are untouched
    assert kept.any(dim=1).all()


def test_both_orderings_agree_and_the_candidates_path_is_taken(monkeypatch):
    logits = random_logits(6, 4096, seed=3)
    top_k, top_p = [20, 5, 1, 50, 20, 7], [0.95, 1.0, 0.5, 0.9, 1.0, 0.3]
    calls = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **kw: calls.append(a) or real_topk(self, *a, **kw))
    fast = _top_k_top_p(logits, top_k, top_p)
    assert calls and calls[0][0] == 50  # the largest k candidates, not a sort
    monkeypatch.setattr(sampler, "TOP_K_CANDIDATES_MAX", 0)  # force the sort (the CPU's way) ...
    assert torch.equal(torch.isinf(fast), torch.isinf(_top_k_top_p(logits, top_k, top_p)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # ... or the kernel
    use_interpreter()
    monkeypatch.setattr(sampler, "FILTER_KERNEL_ON_CPU", True)
    assert torch.equal(torch.isinf(fast), torch.isinf(_top_k_top_p(logits, top_k, top_p)))
    assert _top_k_top_p(logits, [0] * 6, [1.0] * 6) is logits  # nothing asked: nothing done


@pytest.mark.parametrize("vocab", [1, 7, 1000, 1025])
def test_kernel_on_awkward_rows(vocab, monkeypatch):
    """The kernel beside the sort on odd widths (one block, a partial last block) and
    awkward rows: all tokens equal, one finite token among -inf, negative and positive
    zeros, logits far apart, a few tied levels, k = vocab, k = 1, p just under 1 and tiny p."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    use_interpreter()
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=g) * 4
    logits[0] = 1.5  # all tied
    logits[1] = INF
    logits[1, vocab // 2] = -3.0  # one finite token
    logits[2, ::2] = -0.0
    logits[2, 1::2] = 0.0
    logits[3] *= 1e4  # far apart: the search spans many exponents
    logits[4] = logits[4].round()  # a few levels, so many ties at the top-p threshold
    top_k = [0, 1, vocab, 3, 0, vocab + 5, 2, 0]
    top_p = [0.5, 0.9, 0.999999, 0.7, 0.9, 1e-6, 1.0, 0.3]
    got = ks.top_k_top_p_filter(logits, top_k, top_p)
    want = ks.top_k_top_p_filter_reference(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(reference(logits, top_k, top_p))), \
        (torch.isinf(got) != torch.isinf(want)).sum(dim=1)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept]) and kept.any(dim=1).all()


class _RecordingFlashInfer:
    """Stands in for flashinfer.sampling to check what the sampler would hand it (the real
    kernel runs in tests/gpu/test_sampler_gpu.py)."""

    def __init__(self):
        self.calls = []

    def top_k_top_p_sampling_from_logits(self, logits, top_k, top_p, **kw):
        self.calls.append((logits.clone(), top_k.tolist(), top_p.tolist(), kw))
        return torch.zeros(logits.shape[0], dtype=torch.int32)


def test_which_batches_flashinfer_draws():
    """FlashInfer draws a batch only where it stands for our draw: some row asks top-k or
    top-p, no sampling row is seeded or asks min-p. It gets the temperature-scaled logits,
    each row's k (the vocabulary where none) and p, top-k first."""
    from raylm.workers.messages import SamplingOptions
    from raylm.workers.sampler import SamplingState, _flashinfer_draw, flashinfer_sampling

    assert flashinfer_sampling(torch.device("cpu")) is None  # CUDA only
    logits = torch.randn(3, 50)

    def states(*options):
        return [SamplingState.of_request([1], o, torch.device("cpu")) for o in options]

    fi = _RecordingFlashInfer()
    got = _flashinfer_draw(fi, logits, states(SamplingOptions(temperature=0.5, top_p=0.9),
                                              SamplingOptions(temperature=0.5, top_k=7),
                                              SamplingOptions(temperature=0.0, seed=3)), None)  # greedy
    assert got.dtype == torch.long and len(fi.calls) == 1
    scaled, ks, ps, kw = fi.calls[0]
    assert torch.allclose(scaled[:2], logits[:2] / 0.5)  # (the greedy row's token is the argmax)
    assert ks == [50, 7, 50] and ps == pytest.approx([0.9, 1.0, 1.0])
    assert kw["filter_apply_order"] == "top_k_first"
    for options in [(SamplingOptions(top_p=0.9, seed=1), SamplingOptions(top_p=0.9)),  # a seeded row
                    (SamplingOptions(top_p=0.9, min_p=0.1), SamplingOptions()),  # min-p
                    (SamplingOptions(temperature=0.7), SamplingOptions())]:  # no filter asked
        assert _flashinfer_draw(fi, logits[:2], states(*options), None) is None
    assert len(fi.calls) == 1
