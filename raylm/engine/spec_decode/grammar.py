"""Speculative decoding of structured-output requests, the engine core's side: a
request's proposals are checked against its xgrammar `GrammarMatcher` (only the longest
prefix that the grammar accepts is verified), and each verified row gets one next-token
bitmask per position (the matcher's state before proposal j, for j = 0..k), so that the
workers sample every position as constrained decoding would. The matcher is always
rolled back: after the step the core advances it over the emitted tokens only."""
from __future__ import annotations

from typing import Sequence


def grammar_prefix(matcher, proposals: Sequence[int]) -> int:
    """How many leading proposals the grammar accepts, stopping before a token that
    would end the grammar (the position after it would have no constrained mask; that
    token is sampled as the row's last token instead). The matcher is left unchanged."""
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
    return taken - 1 if ended and taken else taken


def position_bitmasks(matchers: Sequence, proposals: Sequence[Sequence[int]], mask_vocab: int) -> bytes:
    """Row i's k_i + 1 next-token bitmasks (before each proposal, then after all of
    them), rows in order, packed int32 (StepPlan.spec_bitmask). Every proposal must be
    one that grammar_prefix kept; the matchers are rolled back."""
    import xgrammar as xgr

    buf = xgr.allocate_token_bitmask(sum(len(p) + 1 for p in proposals), mask_vocab)
    r = 0
    for m, props in zip(matchers, proposals):
        for j, t in enumerate(props):
            m.fill_next_token_bitmask(buf, r)
            r += 1
            if not m.accept_token(t):
                m.rollback(j)
                raise RuntimeError(f"proposal {t} at position {j} does not match the grammar")
        m.fill_next_token_bitmask(buf, r)
        r += 1
        if props:
            m.rollback(len(props))
    return buf.numpy().tobytes()
