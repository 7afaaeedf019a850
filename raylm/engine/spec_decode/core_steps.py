"""Speculative decoding in the engine core's step loop: which requests propose, their
proposals (a grammar request's cut by its grammar, see `spec_decode.grammar`: n-gram
proposals to the longest prefix it accepts, a draft model's or EAGLE head's through the
first one it refuses or that ends it), the rows whose next proposals the workers draft,
and the tokens each verified row emitted."""
from __future__ import annotations

from typing import Iterator

from raylm.engine.spec_decode.grammar import drafted_prefix, grammar_prefix
from raylm.engine.spec_decode.speculator import Speculator


class SpecSteps:
    """The core's speculative steps, over its `speculator` and its `requests` dict (id ->
    core request state, whose `grammar` is its matcher or None)."""

    def __init__(self, speculator: Speculator, requests: dict):
        self.speculator = speculator
        self.requests = requests

    def eligible(self, req) -> bool:
        """Every live request speculates, grammar requests too (their proposals are cut
        by the grammar in `propose`)."""
        return req.request_id in self.requests

    def propose(self, running) -> list:
        """Proposals for the running decodes. A grammar request keeps, of n-gram
        proposals, the longest prefix its grammar accepts; of proposals drafted on the
        workers (verified by rejection sampling), those up to and including the first its
        grammar refuses or that ends it (cutting on a drafted token's value would bias
        the output; a prefix keeps the draft probabilities' rows aligned)."""
        proposed = self.speculator.propose(running, self.eligible)
        cut = drafted_prefix if self.speculator.on_workers else grammar_prefix
        for req in proposed:
            state = self.requests.get(req.request_id)
            if state is not None and state.grammar is not None:
                del req.spec_token_ids[cut(state.grammar, req.spec_token_ids):]
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
