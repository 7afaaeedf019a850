"""Iteration-level continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Running requests are served first (a decode costs one token, an
unfinished prompt takes a chunk of what is left of the budget); then waiting requests
are admitted, their prompts chunked to fit. Prefill chunks and decodes share one step:
the plan is just `{request_id: num_tokens}`. When blocks run out, the lowest-priority
(newest) running request is preempted: its blocks are freed and it later recomputes.

Speculative decoding: a decoding request may carry proposals (`Request.spec_token_ids`).
Its row then computes the last token and the proposals, so the step verifies them all.
Proposals only take what the base rows leave of the budget and the free blocks (they
are trimmed, never a reason to preempt), and `update_after_step` rolls back the rejected.
A draft model or EAGLE head writes its proposals' KV past a row's last token before the
engine sees them: `num_lookahead_tokens` (vLLM's) extra slots are held for every
scheduled row, and the blocks of rejected proposals stay with the request for the next
proposals (they are never hashed: hashes cover only blocks full of verified tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from raylm.scheduler.block_manager import BlockManager
from raylm.scheduler.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    # A long prompt may take at most this many tokens in one step (0 = no limit other
    # than the budget), so one long prompt cannot starve the others' prefills.
    long_prefill_token_threshold: int = 0
    # Slots held past each scheduled row for a model-based proposer (0: n-gram or none).
    num_lookahead_tokens: int = 0


@dataclass
class ScheduledSeq:
    """One row of a step: compute `token_ids` at positions start_pos.. of the request."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    # True when this chunk reaches the last known token, so the step samples a new one.
    sample: bool
    # Proposals to verify: the last len(spec_token_ids) entries of token_ids. The step
    # samples at each of them and at the last known token (1 + len positions).
    spec_token_ids: Sequence[int] = ()


@dataclass
class SchedulerOutput:
    """The step plan: which requests run, how many tokens each, and their block tables."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # Requests whose block table lost its tail since the last plan (blocks that held only
    # rejected proposals): request id -> how many leading block ids are unchanged. A
    # worker holding more of that table must drop the rest before reading this plan.
    truncated_block_tables: dict[str, int] = field(default_factory=dict)

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request_id: len(s.token_ids) for s in self.seqs}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def num_spec_tokens(self) -> int:
        """How many proposals this step verifies."""
        return sum(len(s.spec_token_ids) for s in self.seqs)

    @property
    def is_mixed(self) -> bool:
        """True when prefill chunks and decodes (with or without proposals) ran in the same step."""
        has_decode = any(len(s.token_ids) - len(s.spec_token_ids) == 1 and s.sample and s.start_pos > 0
                         for s in self.seqs)
        has_prefill = any(len(s.token_ids) - len(s.spec_token_ids) > 1 or not s.sample
                          for s in self.seqs)
        return has_decode and has_prefill

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_mixed_steps = 0
        self.num_steps = 0
        # vLLM's spec_decode_num_draft_tokens / num_accepted_tokens counters.
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self._truncated: dict[str, int] = {}  # for the next SchedulerOutput

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.num_tokens > self.config.max_model_len:
            raise ValueError(f"prompt has {request.num_tokens} tokens; "
                             f"max_model_len is {self.config.max_model_len}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Optional[Request]:
        """Finish (or abort) a request wherever it is and free its blocks at once."""
        assert status.is_finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
        return request

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        done = [self.finish_request(r, RequestStatus.FINISHED_ABORTED) for r in request_ids]
        return [r for r in done if r is not None]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the policy ----------------------------------------------------------------
    def _chunk(self, request: Request, budget: int) -> int:
        n = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _lookahead(self, request: Request, n: int, cached_tokens: int = 0) -> int:
        """Slots to hold past a row of n tokens for the proposer (none past max_model_len)."""
        look = self.config.num_lookahead_tokens
        if not look:
            return 0
        end = max(request.num_computed_tokens, cached_tokens) + n
        return max(0, min(look, self.config.max_model_len - end))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.spec_token_ids = []  # proposals past tokens it must now recompute
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Plan one step. Requests keep their place in priority/FCFS order."""
        out = SchedulerOutput()
        if self._truncated:
            out.truncated_block_tables, self._truncated = self._truncated, {}
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        scheduled: list[tuple[Request, int]] = []

        # 1. Running requests, best first; preempt from the tail when blocks run out.
        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget)
            if n <= 0 or (request.num_pending and (
                    request.output_limit_reached
                    or request.num_tokens >= self.config.max_model_len)):
                # Nothing to compute, or only tokens past its end while a launched step
                # samples its last one: it finishes when that step is recorded.
                i += 1
                continue
            while not bm.allocate_slots(request, n + self._lookahead(request, n)):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append((request, n))
                budget -= n
                i += 1
                continue
            break  # the current request preempted itself: nothing more fits

        # 2. Proposals of the decodes scheduled so far, from what the base rows left.
        spec_of: dict[str, list[int]] = {}
        if any(r.spec_token_ids for r in self.running):
            budget = self._schedule_proposals(scheduled, budget, spec_of)

        # 3. Waiting requests, unless something had to be preempted this step.
        self.waiting.sort(key=Request.sort_key)
        prefilling_groups = {r.prefix_group for r in self.running
                             if r.prefix_group is not None and r.is_prefilling}
        if not out.preempted_ids:
            j = 0
            while (j < len(self.waiting) and budget > 0
                   and len(self.running) < self.config.max_num_seqs):
                request = self.waiting[j]
                if request.prefix_group is not None and request.prefix_group in prefilling_groups:
                    j += 1  # let the sibling fill the prefix cache first
                    continue
                cached = bm.find_cached_prefix(request)
                cached_tokens = len(cached) * bm.block_size
                n = min(request.num_tokens - cached_tokens, budget)
                if self.config.long_prefill_token_threshold > 0:
                    n = min(n, self.config.long_prefill_token_threshold)
                if not bm.allocate_slots(request, n + self._lookahead(request, n, cached_tokens), cached):
                    break
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = cached_tokens
                self.waiting.pop(j)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                if request.prefix_group is not None and request.is_prefilling:
                    prefilling_groups.add(request.prefix_group)
                scheduled.append((request, n))
                budget -= n

        for request, n in scheduled:
            start = request.num_computed_tokens
            spec = spec_of.get(request.request_id)
            if spec is None:
                seq = ScheduledSeq(
                    request_id=request.request_id,
                    token_ids=request.token_ids[start:start + n],
                    start_pos=start,
                    block_table=request.block_ids,  # read at once by the planner: no copy
                    sample=start + n == request.num_tokens,
                )
            else:
                seq = ScheduledSeq(request.request_id, request.token_ids[start:] + spec, start,
                                   request.block_ids, True, spec)
            out.seqs.append(seq)
        if out.seqs:
            self.num_steps += 1
            if out.is_mixed:
                self.num_mixed_steps += 1
        return out

    def update_after_step(self, output: SchedulerOutput,
                          num_accepted: Optional[dict[str, int]] = None) -> None:
        """Mark the planned tokens computed and cache the blocks they filled. The caller
        then appends sampled tokens (`Request.append_output_token`) and finishes requests.

        A row with proposals needs `num_accepted[request_id]` (0..len(proposals)): the
        rejected ones are rolled back (see `rollback`); the caller appends the accepted
        proposals and the one token sampled after them."""
        for seq in output.seqs:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            request.num_computed_tokens = seq.start_pos + len(seq.token_ids)
            if seq.spec_token_ids:
                self.rollback(request, len(seq.spec_token_ids) - self._accepted(seq, num_accepted))
            self.block_manager.cache_full_blocks(request)

    def _accepted(self, seq: ScheduledSeq, num_accepted: Optional[dict[str, int]]) -> int:
        k = len(seq.spec_token_ids)
        if num_accepted is None or seq.request_id not in num_accepted:
            raise ValueError(f"request {seq.request_id!r} verified {k} proposals this step: "
                             f"num_accepted must say how many were accepted")
        a = num_accepted[seq.request_id]
        if not 0 <= a <= k:
            raise ValueError(f"num_accepted[{seq.request_id!r}] is {a}; the step verified "
                             f"{k} proposals, so it must be in [0, {k}]")
        self.num_draft_tokens += k
        self.num_accepted_tokens += a
        return a

    def rollback(self, request: Request, num_rejected: int) -> None:
        """Forget the KV of the last `num_rejected` computed positions (rejected proposals)
        and free the blocks that held only them. Prefix-cache hashes are untouched: they
        only ever cover blocks full of verified tokens."""
        if num_rejected <= 0:
            return
        if num_rejected > request.num_computed_tokens:
            raise ValueError(f"cannot roll back {num_rejected} positions of request "
                             f"{request.request_id!r}: it has {request.num_computed_tokens} computed")
        request.num_computed_tokens -= num_rejected
        if self.config.num_lookahead_tokens:
            return  # the blocks stay for the next proposals (see the module doc)
        if self.block_manager.free_tail(request, request.num_computed_tokens):
            rid = request.request_id
            self._truncated[rid] = min(len(request.block_ids), self._truncated.get(rid, 1 << 62))

    # ---- speculative decoding ------------------------------------------------------
    def _num_proposals(self, request: Request, num_spec: int, budget: int) -> int:
        """How many of its `num_spec` proposals a decoding request may verify this step:
        what the budget, max_model_len, its max_tokens and the free blocks allow."""
        n = min(num_spec, budget,
                # The step emits up to 1 + n tokens; none may pass max_model_len...
                self.config.max_model_len - request.num_tokens - 1)
        if request.max_output_tokens is not None:  # ... nor max_tokens
            n = min(n, request.max_output_tokens - request.num_output_tokens - 1)
        bm = self.block_manager
        room = (len(request.block_ids) + bm.num_free_blocks) * bm.block_size
        return min(n, room - request.num_computed_tokens - 1
                 - self.config.num_lookahead_tokens)

    def _schedule_proposals(self, scheduled: list, budget: int, spec_of: dict) -> int:
        """Extend the scheduled decode rows with their proposals (trimmed to fit); the
        proposals are consumed. Returns the budget left."""
        for i, (request, n) in enumerate(scheduled):
            spec, request.spec_token_ids = request.spec_token_ids, []
            if not spec or request.num_pending or n != 1 \
                    or request.num_computed_tokens + 1 != request.num_tokens:
                continue  # not a plain decode of known tokens: nothing to verify
            k = self._num_proposals(request, len(spec), budget)
            if k <= 0:
                continue
            ok = self.block_manager.allocate_slots(request, 1 + k + self._lookahead(request, 1 + k))
            assert ok, "room for the proposals was counted"
            scheduled[i] = (request, 1 + k)
            spec_of[request.request_id] = spec[:k]
            budget -= k
        return budget
