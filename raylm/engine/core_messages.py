"""What crosses between the edge and an engine core: `EngineCoreRequest` (one
completion to generate, in token ids) in, `EngineCoreOutput` (what it gained in a step)
out. Both are plain data with positional msgpack rows (`to_wire` / `from_wire`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from raylm.engine.sampling_params import SamplingParams
from raylm.workers.messages import TokenLogprobs


@dataclass
class EngineCoreRequest:
    """One completion to generate: the prompt's token ids and its own sampling
    parameters (max_tokens resolved, the per-completion seed set)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the user request's n completions
    prefix_group: Optional[str] = None  # the user request id when n > 1
    arrival_time: float = 0.0
    priority: int = 0
    subscriber: Optional[str] = None  # where its outputs go (the cluster's ingress replica)
    # Re-dispatched after its group failed: the last output_offset prompt tokens are output
    # tokens generated before (params.max_tokens counts only the tokens still to come).
    output_offset: int = 0

    @property
    def group_id(self) -> str:
        return self.prefix_group or self.request_id

    def to_wire(self) -> tuple:
        return (self.request_id, self.prompt_token_ids, self.params.to_dict(), self.index,
                self.prefix_group, self.arrival_time, self.priority, self.subscriber, self.output_offset)

    @classmethod
    def from_wire(cls, row) -> "EngineCoreRequest":
        rid, ids, params, index, group, arrival, priority, subscriber, offset = row
        return cls(rid, list(ids), SamplingParams.from_dict(params), index, group, arrival,
                   priority, subscriber, offset)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one core request gained in one step. Log-probability rows are the workers'
    (`TokenLogprobs`); `error` is set when the request failed with its worker group."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: Optional[list[TokenLogprobs]] = None
    prompt_logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None  # "stop", "length", "abort"
    stop_reason: Optional[int] = None  # the stop token id that ended it
    num_cached_tokens: int = 0
    error: Optional[str] = None
    # Where the output goes (in the core's process only; not on the wire).
    subscriber: Optional[str] = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def to_wire(self) -> tuple:
        return (self.request_id, self.new_token_ids,
                None if self.new_logprobs is None else [_lp_row(x) for x in self.new_logprobs],
                None if self.prompt_logprobs is None else [_lp_row(x) for x in self.prompt_logprobs],
                self.finish_reason, self.stop_reason, self.num_cached_tokens, self.error)

    @classmethod
    def from_wire(cls, row) -> "EngineCoreOutput":
        rid, ids, lps, plps, finish, stop, cached, error = row
        return cls(rid, list(ids), None if lps is None else [TokenLogprobs(*x) for x in lps],
                   None if plps is None else [TokenLogprobs(*x) for x in plps],
                   finish, stop, cached, error)


def needs_output_history(p: SamplingParams) -> bool:
    """Its sampling reads the tokens sampled so far (penalties, min_tokens), so under
    asynchronous scheduling the previous step must be recorded before the next launch."""
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0 or (p.min_tokens or 0) > 0)


def _lp_row(t: TokenLogprobs) -> tuple:
    return (t.top_ids, t.top_logprobs, t.token_id, t.logprob, t.rank)
