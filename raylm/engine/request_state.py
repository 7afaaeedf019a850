"""Engine-side state of a request: a `RequestGroup` (one user request, a prompt and its
n completions) holds one `CompletionState` per completion (one scheduler `Request`),
and each builds its user-facing output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from raylm.engine.detokenizer import IncrementalDetokenizer
from raylm.engine.outputs import CompletionOutput, RequestOutput
from raylm.engine.sampling_params import SamplingParams
from raylm.scheduler.request import Request


class NoDetokenizer:
    """Stands in for the detokenizer under skip_tokenizer_init: no text."""

    def add_token(self, token_id: int) -> str:
        return ""


@dataclass(eq=False)
class CompletionState:
    """Engine-side state of one completion (one scheduler Request)."""

    request: Request
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    text: str = ""
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    length_capped: bool = False  # hit max_tokens; finished once its text is checked

    @property
    def needs_current_outputs(self) -> bool:
        """Its sampling reads the tokens sampled so far (penalties, min_tokens), so under
        asynchronous scheduling the previous step must be collected before the next."""
        p = self.params
        return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                or p.frequency_penalty != 0.0 or (p.min_tokens or 0) > 0)

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.request.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass(eq=False)
class RequestGroup:
    """One user request: a prompt and its n completions."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def to_output(self) -> RequestOutput:
        cached = max(0, min(c.request.num_cached_tokens for c in self.completions))
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, prompt_logprobs=self.prompt_logprobs,
            outputs=[c.to_output() for c in self.completions], finished=self.finished,
            num_cached_tokens=cached,
            metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time})
