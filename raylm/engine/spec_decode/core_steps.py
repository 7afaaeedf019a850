"""Speculative decoding in the engine core's step loop: which requests propose, their
proposals (a grammar request's cut to what its grammar accepts), the rows whose next
proposals the workers draft, and the tokens each verified row emitted."""
from __future__ import annotations

from typing import Iterator

from raylm.engine.spec_decode.grammar import grammar_prefix
from raylm.engine.spec_decode.speculator import Speculator


class SpecSteps:
    """The core's speculative steps, over its `speculator` and its `requests` dict (id ->
    core request state, whose `grammar` is its matcher or None)."""

    def __init__(self, speculator: Speculator, requests: dict):
        self.speculator = speculator
        self.requests = requests

    def eligible(self, req) -> bool:
        """Grammar requests speculate with n-gram proposals (checked against the grammar
        in `propose`); a draft model's or EAGLE head's are not offered to them yet."""
        state = self.requests.get(req.request_id)
        return state is not None and (state.grammar is None or not self.speculator.on_workers)

    def propose(self, running) -> list:
        """Proposals for the running decodes; a grammar request keeps the longest prefix
        of its proposals that its grammar accepts."""
        proposed = self.speculator.propose(running, self.eligible)
        for req in proposed:
            state = self.requests.get(req.request_id)
            if state is not None and state.grammar is not None:
                del req.spec_token_ids[grammar_prefix(state.grammar, req.spec_token_ids):]
        return proposed

    def wanted(self, sched_out, scheduler_requests: dict) -> dict[str, int]:
        """The rows whose next proposals the workers draft after this step."""
        return self.speculator.wanted(sched_out, self.eligible, scheduler_requests)

    def emitted(self, sched_out, result, num_accepted: dict) -> Iterator[tuple]:
        """(state, tokens, logprobs or None) of each verified row of a live request: its
        accepted proposals and the token after them. Counts every verified row's
        acceptance first; lazy, so a request the caller ends is skipped after."""
        for s in sched_out.seqs:
            if not s.spec_token_ids:
                continue
            rid = s.request_id
            self.speculator.record(rid, len(s.spec_token_ids), num_accepted[rid])
            state = self.requests.get(rid)
            if state is None:
                continue
            lps = result.spec_logprobs.get(rid) if state.params.logprobs is not None else None
            yield state, result.spec_sampled.get(rid, ()), lps
