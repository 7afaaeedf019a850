"""Top-k and top-p masks (`sampler._top_k_top_p`) against the plain definition: top-k
keeps every token at least as likely as the k-th (ties included), top-p the smallest set
of the most likely remaining tokens whose probability reaches p, rows independent of
each other. Both of its orderings (torch.topk's candidates when every row has a small k,
a sort of the vocabulary otherwise) give the definition's masks, with masked (-inf)
logits and with ties at the k-th value."""
from __future__ import annotations

import pytest
import torch

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
            row[idx[before >= p]] = INF
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
def test_masks_equal_the_definition(top_k, top_p):
    logits = random_logits(len(top_k), 4096, seed=sum(top_k))
    got = _top_k_top_p(logits, top_k, top_p)
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
    monkeypatch.setattr(sampler, "TOP_K_CANDIDATES_MAX", 0)  # force the sort
    assert torch.equal(torch.isinf(fast), torch.isinf(_top_k_top_p(logits, top_k, top_p)))
    assert _top_k_top_p(logits, [0] * 6, [1.0] * 6) is logits  # nothing asked: nothing done
