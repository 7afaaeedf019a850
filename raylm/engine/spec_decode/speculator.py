"""The engine core's side of speculative decoding: before each step it asks the proposer
for the next tokens of the running decodes (`Request.spec_token_ids`, which the
scheduler trims to fit), after it records how many were accepted, per request (adaptive
k) and in vLLM's counters.

A proposer offers `propose(request_ids, token_ids, max_num_tokens) -> proposals` (a
list of token lists) and `remove(request_id)`. N-gram proposals are computed here and
verified one-hot. A draft model or an EAGLE-3 head runs on the workers: the plan of a
step names the rows whose next proposals it should draft (`StepPlan.spec_wanted`,
`Speculator.wanted`), the workers return them with the step's result
(`StepResult.spec_proposals`, kept by `WorkerProposals`) and keep their draft
probabilities for the rejection sampling of the step that verifies them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from raylm.engine.spec_decode.config import SpeculativeConfig
from raylm.scheduler.request import Request

# Adaptive k: a request whose proposal was rejected at its first token with k = 1 sits
# out 2, 4, ... up to this many steps before proposing again.
MAX_BACKOFF_STEPS = 16


class AdaptiveK:
    """Per request k for the next proposal. After a step that verified n proposals and
    accepted a: all accepted, k grows by one (up to k_max); otherwise k becomes a + 1
    (n-gram acceptance comes in runs: a copied stretch accepts everything, elsewhere the
    first token misses). A first-token miss at k = 1 pauses the request's proposals for
    a doubling number of steps. Disabled, k is always k_max."""

    def __init__(self, k_max: int, enabled: bool):
        self.k_max, self.enabled = k_max, enabled
        self._k: dict[str, int] = {}
        self._pause: dict[str, list[int]] = {}  # request id -> [steps left, next pause]

    def k_of(self, request_id: str) -> int:
        """k for this step's proposal (0: sit this step out)."""
        if not self.enabled:
            return self.k_max
        pause = self._pause.get(request_id)
        if pause is not None and pause[0] > 0:
            pause[0] -= 1
            return 0
        return self._k.get(request_id, self.k_max)

    def update(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        if not self.enabled:
            return
        k = self._k.get(request_id, self.k_max)
        if num_accepted >= num_proposed:
            self._k[request_id] = min(self.k_max, k + 1)
            self._pause.pop(request_id, None)
            return
        self._k[request_id] = max(1, num_accepted + 1)
        if num_accepted == 0 and k == 1:
            pause = self._pause.setdefault(request_id, [0, 2])
            pause[0], pause[1] = pause[1], min(MAX_BACKOFF_STEPS, 2 * pause[1])

    def remove(self, request_id: str) -> None:
        self._k.pop(request_id, None)
        self._pause.pop(request_id, None)


class WorkerProposals:
    """The proposals that the workers' draft model or EAGLE head drafted during the last
    step of each request (`StepResult.spec_proposals`), offered for its next step."""

    def __init__(self):
        self.pending: dict[str, list[int]] = {}

    def propose(self, request_ids, token_ids, max_num_tokens) -> list[list[int]]:
        return [self.pending.get(rid, [])[:k] for rid, k in zip(request_ids, max_num_tokens)]

    def update(self, sched_out, proposals: dict, live) -> None:
        """After a step: its rows' earlier proposals are spent or stale, preempted
        requests start over; keep the new proposals of the requests still `live`."""
        for rid in sched_out.preempted_ids:
            self.pending.pop(rid, None)
        for s in sched_out.seqs:
            self.pending.pop(s.request_id, None)
        for rid, props in proposals.items():
            if rid in live:
                self.pending[rid] = props

    def remove(self, request_id: str) -> None:
        self.pending.pop(request_id, None)


def make_proposer(config: SpeculativeConfig):
    """The proposer of `config.method`: n-gram lookup here, or the workers' model."""
    if config.method == "ngram":
        from raylm.engine.spec_decode.ngram import NgramProposer

        return NgramProposer.from_config(config)
    return WorkerProposals()


class Speculator:
    """Proposals before a step, acceptance after it, and the counters vLLM reports
    (spec_decode_num_drafts / num_draft_tokens / num_accepted_tokens / per position)."""

    def __init__(self, config: SpeculativeConfig, proposer=None):
        self.config = config
        self.proposer = proposer if proposer is not None else make_proposer(config)
        self.k = config.num_speculative_tokens
        self.adaptive = AdaptiveK(self.k, config.adaptive_num_speculative_tokens)
        self.max_batch_size = config.max_batch_size
        # A draft model or EAGLE head drafts on the workers during the step before.
        self.on_workers = config.uses_draft_probs
        # EAGLE-3 writes its KV from every step's hidden states: every step waits for its
        # tokens (no asynchronous scheduling).
        self.every_step_sync = config.method == "eagle3"
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * self.k

    def active(self, num_running: int, num_waiting: int = 0) -> bool:
        """Whether this step proposes at all (not above the batch-size limit). A model
        on the workers drafts after a prompt's last chunk too: with nothing running yet,
        the waiting requests count."""
        n = num_running or (num_waiting if self.on_workers else 0)
        return n > 0 and (self.max_batch_size is None or n <= self.max_batch_size)

    def propose(self, running: Iterable[Request], eligible: Callable[[Request], bool]) -> list[Request]:
        """Set `spec_token_ids` of each running plain decode (all tokens known, nothing
        pending) that `eligible` admits; returns the requests given proposals."""
        reqs, ids, tokens, ks = [], [], [], []
        for req in running:
            if req.num_pending or req.num_computed_tokens + 1 != req.num_tokens or not eligible(req):
                continue
            # Proposals drafted on the workers were sized when the step before was planned.
            k = self.k if self.on_workers else self.adaptive.k_of(req.request_id)
            if req.max_output_tokens is not None:  # the step emits up to k + 1 tokens
                k = min(k, req.max_output_tokens - req.num_output_tokens - 1)
            if k <= 0:
                continue
            reqs.append(req)
            ids.append(req.request_id)
            tokens.append(req.token_ids)
            ks.append(k)
        if not reqs:
            return []
        proposals = self.proposer.propose(ids, tokens, ks)
        out = []
        for req, props in zip(reqs, proposals):
            if props:
                req.spec_token_ids = list(props)
                out.append(req)
        return out

    def wanted(self, sched_out, eligible: Callable[[Request], bool], requests: dict) -> dict[str, int]:
        """For a plan (model-based methods): how many proposals to draft after each row
        that samples, for its next step (adaptive k; none past max_tokens)."""
        out = {}
        for s in sched_out.seqs:
            req = requests.get(s.request_id)
            if not s.sample or req is None or not eligible(req):
                continue
            k = self.adaptive.k_of(s.request_id)
            if req.max_output_tokens is not None:  # this step emits >= 1, the next k + 1
                k = min(k, req.max_output_tokens - req.num_output_tokens - 2)
            if k > 0:
                out[s.request_id] = k
        return out

    def after_step(self, sched_out, result, live) -> None:
        """Keep the proposals the workers drafted in this step (model-based methods)."""
        if self.on_workers:
            self.proposer.update(sched_out, result.spec_proposals, live)

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """A row verified `num_proposed` proposals and accepted the first `num_accepted`."""
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1
        self.adaptive.update(request_id, num_proposed, num_accepted)

    def remove(self, request_id: str) -> None:
        self.proposer.remove(request_id)
        self.adaptive.remove(request_id)

    def stats(self) -> dict:
        """vLLM's counters under EngineCore.stats() keys (counts only, so that a cluster
        can sum them over cores; `acceptance_summary` derives the rates)."""
        return {"spec_decode_num_drafts": self.num_drafts,
                "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos)}


def acceptance_summary(stats: dict) -> dict:
    """From a core's (or summed) counters: `spec_decode_acceptance_rate` (accepted over
    draft tokens) and `spec_decode_mean_acceptance_length` (tokens a verified row emitted
    on average: its accepted proposals and the one after them); {} without speculation."""
    if "spec_decode_num_drafts" not in stats:
        return {}
    drafts, tokens = stats["spec_decode_num_drafts"], stats["spec_decode_num_draft_tokens"]
    accepted = stats["spec_decode_num_accepted_tokens"]
    return {"spec_decode_acceptance_rate": accepted / tokens if tokens else 0.0,
            "spec_decode_mean_acceptance_length": 1.0 + accepted / drafts if drafts else 0.0}


def num_accepted_of(sched_out, spec_sampled: dict) -> Optional[dict[str, int]]:
    """{request id: accepted proposals} of a step's rows with proposals (None without)."""
    out = {}
    for s in sched_out.seqs:
        if s.spec_token_ids:
            tokens = spec_sampled.get(s.request_id)
            out[s.request_id] = len(tokens) - 1 if tokens else 0
    return out or None
