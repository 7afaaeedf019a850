"""Speculative decoding of structured-output requests, the engine core's side: a
request's proposals are checked against its xgrammar `GrammarMatcher` and cut, and each
verified row gets one next-token bitmask per position, so that the workers sample every
position as constrained decoding would. The matcher is always rolled back: after the
step the core advances it over the emitted tokens only (all legal: each was sampled
under its position's mask).

The cut depends on how the proposals are verified:
- n-gram proposals (one-hot verification: each position's output is the target's own
  sample there, whatever was proposed, so any cut is exact) keep the longest prefix the
  grammar accepts, stopping before a token that ends it (`grammar_prefix`): the
  cheapest cut.
- a draft model's or EAGLE head's proposals (rejection sampling with their draft
  probabilities q) are kept up to and including the first one the grammar refuses or
  the first one that ends it (`drafted_prefix`). Dropping a proposal because of its
  value would bias the output; a refused proposal has masked target probability 0, so
  it is rejected with probability 1 and its position draws from norm(max(0, p - q)),
  as exact rejection sampling needs. When a proposal that ends the grammar is accepted,
  the request ends there and the core drops the tokens after it.

Masks (`position_bitmasks`): position j's is the matcher's state after proposals
0..j-1 while the grammar accepted them and had not ended; a position after a refused or
ending proposal (no token sampled there is kept) gets an all-allowed mask, never an
all-blocked one, whose softmax would be NaN."""
from __future__ import annotations

from typing import Sequence

ALL_ALLOWED = -1  # an int32 bitmask word with every bit set


def _accepted_run(matcher, proposals: Sequence[int]) -> tuple[int, bool]:
    """(n, ended): the grammar accepts the first n proposals, and `ended` when the n-th
    of them ends it (the walk stops there). The matcher is left unchanged."""
    taken = 0
    for t in proposals:
        if not matcher.accept_token(t):
            break
        taken += 1
        if matcher.is_terminated():
            break
    ended = matcher.is_terminated()
    if taken:
        matcher.rollback(taken)
    return taken, ended


def grammar_prefix(matcher, proposals: Sequence[int]) -> int:
    """N-gram proposals: how many leading proposals the grammar accepts, stopping before
    a token that would end the grammar (one position fewer to verify: that token is
    sampled as the row's last token instead). The matcher is left unchanged."""
    taken, ended = _accepted_run(matcher, proposals)
    return taken - 1 if ended and taken else taken


def drafted_prefix(matcher, proposals: Sequence[int]) -> int:
    """Proposals drafted with probabilities q (draft model, EAGLE head): how many leading
    proposals to verify: those the grammar accepts, through the first one it refuses
    (rejected with probability 1) or the first one that ends it. At least 1 when there
    are proposals and the grammar has not ended. The matcher is left unchanged."""
    taken, ended = _accepted_run(matcher, proposals)
    return taken if ended else min(taken + 1, len(proposals))


def position_bitmasks(matchers: Sequence, proposals: Sequence[Sequence[int]], mask_vocab: int) -> bytes:
    """Row i's k_i + 1 next-token bitmasks, rows in order, packed int32
    (StepPlan.spec_bitmask): position j's is the matcher's state after proposals 0..j-1
    while the grammar accepted them and had not ended, all-allowed after a refused or
    ending proposal (no token sampled there is kept). The matchers are rolled back."""
    import xgrammar as xgr

    buf = xgr.allocate_token_bitmask(sum(len(p) + 1 for p in proposals), mask_vocab)
    r = 0
    for m, props in zip(matchers, proposals):
        taken, live = 0, True
        for j in range(len(props) + 1):
            if not live:  # after a refused or ending proposal: no token sampled here is kept
                buf[r + j].fill_(ALL_ALLOWED)
                continue
            m.fill_next_token_bitmask(buf, r + j)
            if j < len(props):
                live = m.accept_token(props[j])
                taken += live
                live = live and not m.is_terminated()
        if taken:
            m.rollback(taken)
        r += len(props) + 1
    return buf.numpy().tobytes()
