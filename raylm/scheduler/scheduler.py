"""Iteration-level continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`). Running requests are served first (a decode costs one token, an
unfinished prompt takes a chunk of what is left of the budget); then waiting requests
are admitted, their prompts chunked to fit. Prefill chunks and decodes share one step:
the plan is just `{request_id: num_tokens}`. When blocks run out, the lowest-priority
(newest) running request is preempted: its blocks are freed and it later recomputes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

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


@dataclass
class ScheduledSeq:
    """One row of a step: compute `token_ids` at positions start_pos.. of the request."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    # True when this chunk reaches the last known token, so the step samples a new one.
    sample: bool


@dataclass
class SchedulerOutput:
    """The step plan: which requests run, how many tokens each, and their block tables."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request_id: len(s.token_ids) for s in self.seqs}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_mixed(self) -> bool:
        """True when prefill chunks and decodes ran in the same step."""
        has_decode = any(len(s.token_ids) == 1 and s.sample and s.start_pos > 0 for s in self.seqs)
        has_prefill = any(len(s.token_ids) > 1 or not s.sample for s in self.seqs)
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

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Plan one step. Requests keep their place in priority/FCFS order."""
        out = SchedulerOutput()
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
            while not bm.allocate_slots(request, n):
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

        # 2. Waiting requests, unless something had to be preempted this step.
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
                if not bm.allocate_slots(request, n, cached):
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
            out.seqs.append(ScheduledSeq(
                request_id=request.request_id,
                token_ids=request.token_ids[start:start + n],
                start_pos=start,
                block_table=request.block_ids,  # read at once by the planner: no copy
                sample=start + n == request.num_tokens,
            ))
        if out.seqs:
            self.num_steps += 1
            if out.is_mixed:
                self.num_mixed_steps += 1
        return out

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Mark the planned tokens computed and cache the blocks they filled. The caller
        then appends sampled tokens (`Request.append_output_token`) and finishes requests."""
        for seq in output.seqs:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            request.num_computed_tokens = seq.start_pos + len(seq.token_ids)
            self.block_manager.cache_full_blocks(request)
