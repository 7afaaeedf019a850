"""The engine core's introspection: per user request latency metrics (time to first
token, inter-token latency, end-to-end latency, in `CoreMetrics`) and the step loop's
wall-time accounting."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from raylm.engine.metrics import CoreMetrics


@dataclass(eq=False)
class UserRequest:
    """Per user request (all n completions): what its latency metrics need."""

    arrival: float
    remaining: int
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    reasons: list = field(default_factory=list)


class UserRequests:
    """The live user requests (by user request id, the core requests' `prefix_group`),
    feeding `metrics` and the `counters` of prompt tokens and finished requests."""

    def __init__(self, metrics: CoreMetrics, counters: dict):
        self.metrics, self.counters = metrics, counters
        self.users: dict[str, UserRequest] = {}

    def add(self, user_id: str, now: float, num_prompt_tokens: int) -> None:
        """One more core request of the user request (its prompt counted once)."""
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = UserRequest(now, 0)
            self.counters["prompt_tokens"] += num_prompt_tokens
        user.remaining += 1

    def observe_token(self, user_id: str, now: float) -> None:
        user = self.users.get(user_id)
        if user is None:
            return
        if user.first_token is None:
            user.first_token = now
            self.metrics.observe_first_token(now - user.arrival)
        elif user.last_token != now:  # siblings sampled in one step count once
            self.metrics.observe_inter_token(now - user.last_token)
        user.last_token = now

    def finished(self, user_id: str, reason: str) -> None:
        """One core request ended; the last one ends the user request ("abort" if any
        completion was aborted, else the first completion's reason)."""
        user = self.users.get(user_id)
        if user is None:
            return
        user.remaining -= 1
        user.reasons.append(reason)
        if user.remaining <= 0:
            del self.users[user_id]
            self.counters["requests_finished"] += 1
            reason = "abort" if "abort" in user.reasons else user.reasons[0]
            self.metrics.observe_finished(reason, time.monotonic() - user.arrival)


def new_step_timing() -> dict:
    return {"steps": 0, "schedule_s": 0.0, "execute_s": 0.0, "process_s": 0.0, "wait_s": 0.0,
            "grammar_s": 0.0, "deferred_sampling_s": 0.0}


def step_timing_summary(tm: dict) -> dict:
    """Per-step wall time of the step loop: scheduling and output processing (host)
    against the executor call (input preparation, the model, sampling)."""
    n = max(1, tm["steps"])
    return {"steps": tm["steps"], "schedule_ms_per_step": 1e3 * tm["schedule_s"] / n,
            "execute_ms_per_step": 1e3 * tm["execute_s"] / n,
            "process_ms_per_step": 1e3 * tm["process_s"] / n,
            # Asynchronous scheduling: time spent waiting for the step in flight (near
            # zero means the host, not the device, sets the pace).
            "device_wait_ms_per_step": 1e3 * tm["wait_s"] / n,
            # Structured outputs: next-token bitmasks filled (part of execute_ms_per_step
            # when the step waits for them before its launch), and with asynchronous
            # scheduling the sampling queued once they are (outside the others).
            "grammar_ms_per_step": 1e3 * tm.get("grammar_s", 0.0) / n,
            "deferred_sampling_ms_per_step": 1e3 * tm.get("deferred_sampling_s", 0.0) / n}
