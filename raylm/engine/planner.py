"""Turns a scheduler step (`SchedulerOutput`) into the step plan the workers run
(`raylm.workers.messages.StepPlan`): per-step diffs, as vLLM V1's SchedulerOutput.

The planner remembers which requests the workers know, so a request's prompt and
sampling options cross the wire once; how many of each request's block ids they hold,
so a row carries only the blocks added since; and which requests finished or were
aborted, so the workers drop their state with the next plan.
"""
from __future__ import annotations

from typing import Callable, Optional

from raylm.scheduler.request import PLACEHOLDER_TOKEN as _SCHEDULER_PLACEHOLDER
from raylm.workers.messages import PLACEHOLDER_TOKEN, NewRequest, SamplingOptions, SeqChunk, StepPlan

# The scheduler's placeholder inputs reach the workers as they are.
assert _SCHEDULER_PLACEHOLDER == PLACEHOLDER_TOKEN, (_SCHEDULER_PLACEHOLDER, PLACEHOLDER_TOKEN)


class StepPlanner:
    """`new_request_of(request_id)` gives a request's NewRequest the first time it is
    scheduled (its prompt and sampling options)."""

    def __init__(self, new_request_of: Callable[[str], NewRequest]):
        self._new_request_of = new_request_of
        self._known: set[str] = set()
        self._finished: list[str] = []
        # request id -> [block ids the workers hold, position where its last row ended]
        self._sent: dict[str, list[int]] = {}

    def finished(self, request_id: str) -> None:
        """The request ended (or was aborted): the workers drop its state next step."""
        self._sent.pop(request_id, None)
        if request_id in self._known:
            self._known.discard(request_id)
            self._finished.append(request_id)

    @property
    def has_finished(self) -> bool:
        return bool(self._finished)

    def plan(self, sched_out) -> StepPlan:
        """The plan of one scheduler step (None or an empty step: only the finished ids).
        A preempted request's count starts over: its next row sends its whole new table."""
        preempted = list(sched_out.preempted_ids) if sched_out is not None else []
        plan = StepPlan(finished_ids=self._finished, preempted_ids=preempted)
        self._finished = []
        sent = self._sent
        for rid in preempted:
            sent.pop(rid, None)
        truncated = sched_out.truncated_block_tables if sched_out is not None else None
        if truncated:
            # Rejected proposals gave back the tail of these tables: the workers drop the
            # table and the next row sends it whole (as after a preemption).
            for rid in truncated:
                state = sent.get(rid)
                if state is not None and rid not in preempted:
                    plan.preempted_ids.append(rid)
                    state[0] = 0
        for s in (sched_out.seqs if sched_out is not None else ()):
            rid = s.request_id
            if rid not in self._known:
                plan.new_requests.append(self._new_request_of(rid))
                self._known.add(rid)
            state = sent.get(rid)
            if state is None:
                state = sent[rid] = [0, 0]
            elif s.start_pos < state[1]:
                # It starts over, so it was preempted by a step that reached no plan: the
                # workers drop its table first, as for any preempted request.
                plan.preempted_ids.append(rid)
                state[0] = 0
            table = s.block_table
            new = table[state[0]:]
            state[0] = len(table)
            k = len(s.spec_token_ids)
            # Proposals may be rolled back: the next row may start right after the last
            # known token, not after them.
            state[1] = s.start_pos + len(s.token_ids) - k
            plan.seqs.append(SeqChunk(rid, s.token_ids, s.start_pos, new, s.sample, k))
        return plan


def worker_sampling(params, eos_token_ids: list[int], index: int, output_offset: int = 0,
                    bad_words_token_ids: Optional[list[list[int]]] = None) -> SamplingOptions:
    """What the worker's sampler needs of a completion's SamplingParams; completions after
    the first (index > 0) leave prompt logprobs to the first. `output_offset`: the last
    that many tokens of the prompt sent are outputs generated earlier, by another worker
    group (re-dispatch by recompute); `params` keep the original min_tokens and seed.
    `bad_words_token_ids`: the tokenizations of params.bad_words (the core tokenizes)."""
    return SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        seed=params.seed, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        min_tokens=params.min_tokens, stop_token_ids=list(params.stop_token_ids),
        eos_token_ids=list(eos_token_ids), ignore_eos=params.ignore_eos, logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs if index == 0 else None, output_offset=output_offset,
        logit_bias=list(params.logit_bias.items()) if params.logit_bias else None,
        allowed_token_ids=params.allowed_token_ids, bad_words_token_ids=bad_words_token_ids)
