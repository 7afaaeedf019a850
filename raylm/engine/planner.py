"""Turns a scheduler step (`SchedulerOutput`) into the step plan the workers run
(`raylm.workers.messages.StepPlan`): a new request's data once, then per-step rows.

The planner remembers which requests the workers know, so a request's prompt and
sampling settings cross the wire once, and which of them finished or were aborted,
so the workers drop their state with the next plan.
"""
from __future__ import annotations

from typing import Callable

from raylm.workers.messages import NewRequest, StepPlan


class StepPlanner:
    """`new_request_of(request_id)` gives a request's NewRequest the first time it is
    scheduled (its prompt and sampling settings)."""

    def __init__(self, new_request_of: Callable[[str], NewRequest]):
        self._new_request_of = new_request_of
        self._known: set[str] = set()
        self._finished: list[str] = []

    def finished(self, request_id: str) -> None:
        """The request ended (or was aborted): the workers drop its state next step."""
        if request_id in self._known:
            self._known.discard(request_id)
            self._finished.append(request_id)

    @property
    def has_finished(self) -> bool:
        return bool(self._finished)

    def plan(self, sched_out) -> StepPlan:
        plan = StepPlan(finished_ids=self._finished,
                        preempted_ids=list(sched_out.preempted_ids) if sched_out else [])
        self._finished = []
        for s in (sched_out.seqs if sched_out else ()):
            plan.seqs.append(s)
            if s.request_id not in self._known:
                plan.new_requests.append(self._new_request_of(s.request_id))
                self._known.add(s.request_id)
        return plan


def worker_sampling(params, eos_token_ids: list[int], index: int) -> dict:
    """What the worker's sampler needs of a completion's SamplingParams."""
    sampling = params.to_dict()
    sampling["eos_token_ids"] = eos_token_ids
    if index > 0:
        sampling["prompt_logprobs"] = None
    return sampling



