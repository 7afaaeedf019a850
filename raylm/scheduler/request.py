"""The scheduler's view of one sequence: its tokens, progress and block table."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional


# Stands in for a token that a launched step will sample (asynchronous scheduling): the
# next step is planned before the token is known, and the worker reads it on the device.
PLACEHOLDER_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence to generate. `token_ids` is the prompt followed by the output so far;
    `num_computed_tokens` of them already have their KV in the blocks of `block_ids`."""

    request_id: str
    prompt_token_ids: list[int]
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # False for requests that need every prompt position's logits (prompt_logprobs).
    use_prefix_cache: bool = True
    # Siblings of an n > 1 request share a group: only one of them prefills at a time,
    # so the others find the prompt in the prefix cache.
    prefix_group: Optional[str] = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 until scheduled
    num_preemptions: int = 0
    # Asynchronous scheduling: tokens at the end of token_ids still PLACEHOLDER_TOKEN.
    num_pending: int = 0
    # The request stops after this many output tokens (None: no limit known here). The
    # scheduler does not plan a step that could only produce tokens past it.
    max_output_tokens: Optional[int] = None
    # Speculative decoding: proposed next tokens (after the last of token_ids) that the
    # engine wants verified. The scheduler consumes them when it schedules the request
    # (trimmed to fit), and drops them on preemption; they never enter token_ids.
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """True while the prompt (or, after preemption, prompt plus output) is being computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def append_placeholder(self) -> None:
        """A launched step will sample this request's next token: plan past it."""
        self.token_ids.append(PLACEHOLDER_TOKEN)
        self.num_pending += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """The oldest placeholder's token arrived."""
        assert self.num_pending > 0, f"request {self.request_id} has no placeholder to resolve"
        self.token_ids[len(self.token_ids) - self.num_pending] = token_id
        self.output_token_ids.append(token_id)
        self.num_pending -= 1

    @property
    def output_limit_reached(self) -> bool:
        """True when the tokens sampled or in flight already reach max_output_tokens."""
        return (self.max_output_tokens is not None
                and len(self.output_token_ids) + self.num_pending >= self.max_output_tokens)

    def sort_key(self) -> tuple:
        """Lower is served first: priority, then arrival (FCFS)."""
        return (self.priority, self.arrival_time)
