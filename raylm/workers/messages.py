"""The step plan sent to workers and the result they send back: plain data that
msgpack can carry (see `to_wire` / `from_wire`). The wire form is built by hand as
positional rows: `dataclasses.asdict` deep-copies recursively and took 13 ms for a
256-sequence decode plan on the 2-core CPU, more than a GPU step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# A row of the plan is the scheduler's own record: compute `token_ids` of a request at
# positions start_pos..; sample after it if `sample`.
from raylm.scheduler.scheduler import ScheduledSeq as SeqChunk


@dataclass
class NewRequest:
    """Sent once, the first time a request is scheduled: what the sampler needs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict


@dataclass
class StepPlan:
    seqs: list[SeqChunk] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    # Requests whose blocks were taken back this step: their block tables start over.
    preempted_ids: list[str] = field(default_factory=list)

    def to_wire(self) -> dict:
        return {"seqs": [(s.request_id, s.token_ids, s.start_pos, s.block_table, s.sample) for s in self.seqs],
                "new_requests": [(r.request_id, r.prompt_token_ids, r.sampling) for r in self.new_requests],
                "finished_ids": self.finished_ids, "preempted_ids": self.preempted_ids}

    @classmethod
    def from_wire(cls, d: dict) -> "StepPlan":
        return cls(seqs=[SeqChunk(*s) for s in d["seqs"]],
                   new_requests=[NewRequest(*r) for r in d["new_requests"]],
                   finished_ids=list(d["finished_ids"]),
                   preempted_ids=list(d.get("preempted_ids", ())))


@dataclass
class TokenLogprobs:
    """Log-probabilities at one position: the top-k and the chosen (or actual) token."""

    top_ids: list[int]
    top_logprobs: list[float]
    token_id: int
    logprob: float
    rank: int


@dataclass
class StepResult:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Prompt logprobs for the prompt positions this step computed, in order.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    execute_time_s: Optional[float] = None

    def to_wire(self) -> dict:
        return {"sampled": self.sampled,
                "logprobs": {k: _lp_row(v) for k, v in self.logprobs.items()},
                "prompt_logprobs": {k: [_lp_row(x) for x in v] for k, v in self.prompt_logprobs.items()},
                "execute_time_s": self.execute_time_s}

    @classmethod
    def from_wire(cls, d: dict) -> "StepResult":
        return cls(sampled=dict(d["sampled"]),
                   logprobs={k: TokenLogprobs(*v) for k, v in d["logprobs"].items()},
                   prompt_logprobs={k: [TokenLogprobs(*x) for x in v]
                                    for k, v in d["prompt_logprobs"].items()},
                   execute_time_s=d.get("execute_time_s"))


def _lp_row(t: TokenLogprobs) -> tuple:
    return (t.top_ids, t.top_logprobs, t.token_id, t.logprob, t.rank)
