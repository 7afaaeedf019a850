"""Results handed back to users, shaped like vLLM's `RequestOutput`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

# One dict per position: {token_id: Logprob} holding the top-k tokens plus the chosen one.
SampleLogprobs = list[dict[int, "Logprob"]]
PromptLogprobs = list[Optional[dict[int, "Logprob"]]]


@dataclass
class Logprob:
    """The model's raw log-probability of a token, its 1-based rank, and its text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or None while running
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and every completion so far."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
