"""The contract between the engine and the workers: the step plan sent to them and the
result they send back, plain data that msgpack can carry (see `to_wire` / `from_wire`).

As vLLM V1's SchedulerOutput, a plan is per-step diffs: a request's prompt and sampling
options cross once (`NewRequest`), and each row carries only the block ids appended to
the request's block table since the last plan that scheduled it (`new_block_ids`); the
workers keep the tables. This module imports nothing of the engine or the scheduler.

The wire form is built by hand as positional rows: `dataclasses.asdict` deep-copies
recursively and took 13 ms for a 256-sequence decode plan on the 2-core CPU, more than a
GPU step."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

# Stands in for an input token that the previous launched step is still sampling
# (asynchronous scheduling): the worker reads it from that step's tokens on the device.
PLACEHOLDER_TOKEN = -1


@dataclass
class SamplingOptions:
    """What the worker's sampler needs of a request (vLLM's SamplingParams names); the
    defaults disable each option."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # stop and EOS tokens are banned until this many outputs (offset included)
    stop_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top-k log-probabilities of each sampled token
    prompt_logprobs: Optional[int] = None  # ... and of each prompt token
    # The last `output_offset` tokens of the request's prompt (NewRequest.prompt_token_ids)
    # are outputs another worker group generated before it failed (re-dispatch by
    # recompute): penalties and min_tokens count them as outputs, and a seeded request
    # continues with the draws of output position `output_offset` onwards.
    output_offset: int = 0
    # Logits processors (see raylm.workers.logits_processors); None disables each.
    logit_bias: Optional[list[tuple[int, float]]] = None  # (token id, bias) pairs
    allowed_token_ids: Optional[list[int]] = None
    bad_words_token_ids: Optional[list[list[int]]] = None  # each a bad word's tokenization

    def to_wire(self) -> tuple:
        return tuple(getattr(self, name) for name in _OPTION_FIELDS)

    @classmethod
    def from_wire(cls, row) -> "SamplingOptions":
        return cls(*row)


_OPTION_FIELDS = tuple(f.name for f in fields(SamplingOptions))


@dataclass
class NewRequest:
    """Sent once, the first time a request is scheduled: what the sampler needs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions


@dataclass
class SeqChunk:
    """One row of a plan: compute `token_ids` of the request at positions start_pos..,
    then sample a token if `sample`. `new_block_ids` extend the request's block table:
    all of it the first time it is scheduled (and again after a preemption), afterwards
    only the blocks added since (usually none)."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    new_block_ids: list[int]
    sample: bool
    # Speculative decoding: the last num_spec_tokens of token_ids are proposals; the row
    # samples at each of them and at the token before them, and verifies the proposals.
    num_spec_tokens: int = 0


@dataclass
class StepPlan:
    seqs: list[SeqChunk] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    # The workers drop these requests' state (sampling state, block table).
    finished_ids: list[str] = field(default_factory=list)
    # Requests whose blocks were taken back: the workers drop their block tables (before
    # reading this plan's rows), and a later row sends the whole new table.
    preempted_ids: list[str] = field(default_factory=list)
    # Structured outputs: the next-token bitmask of each sampling row of these requests,
    # packed int32 rows of ceil(vocab/32) words (bit j of word w allows token 32*w + j),
    # in bitmask_ids' order. Absent (and off the wire) when no row has a grammar. With
    # the model in the engine's process, an int32 CPU tensor of those rows instead (no
    # bytes made; page-locked on CUDA); the wire always carries bytes.
    bitmask_ids: list[str] = field(default_factory=list)
    bitmask: Any = None
    # ... and of each row of these requests that verifies k proposals: k + 1 bitmasks,
    # one per verified position (the grammar's state before proposal j, j = 0..k), rows
    # in spec_bitmask_ids' order. Absent (and off the wire) when no such row has a grammar.
    spec_bitmask_ids: list[str] = field(default_factory=list)
    spec_bitmask: Optional[bytes] = None
    # Model-based speculation (draft model, EAGLE-3): request id -> how many proposals
    # the worker should draft after this step's row of that request (its next step
    # verifies them). Absent (and off the wire) without such speculation.
    spec_wanted: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict:
        # A row carries num_spec_tokens only when it has proposals (most rows have none).
        d = {"seqs": [(s.request_id, s.token_ids, s.start_pos, s.new_block_ids, s.sample)
                      if not s.num_spec_tokens else
                      (s.request_id, s.token_ids, s.start_pos, s.new_block_ids, s.sample, s.num_spec_tokens)
                      for s in self.seqs],
             "new_requests": [(r.request_id, r.prompt_token_ids, r.sampling.to_wire())
                              for r in self.new_requests],
             "finished_ids": self.finished_ids, "preempted_ids": self.preempted_ids}
        if self.bitmask_ids:
            mask = self.bitmask
            d["bitmask"] = (self.bitmask_ids, mask if isinstance(mask, bytes) else mask.numpy().tobytes())
        if self.spec_bitmask_ids:
            d["spec_bitmask"] = (self.spec_bitmask_ids, self.spec_bitmask)
        if self.spec_wanted:
            d["spec_wanted"] = self.spec_wanted
        return d

    @classmethod
    def from_wire(cls, d: dict) -> "StepPlan":
        ids, mask = d.get("bitmask") or ([], None)
        spec_ids, spec_mask = d.get("spec_bitmask") or ([], None)
        return cls(seqs=[SeqChunk(*s) for s in d["seqs"]],
                   new_requests=[NewRequest(r[0], r[1], SamplingOptions.from_wire(r[2]))
                                 for r in d["new_requests"]],
                   finished_ids=list(d["finished_ids"]),
                   preempted_ids=list(d["preempted_ids"]), bitmask_ids=list(ids), bitmask=mask,
                   spec_bitmask_ids=list(spec_ids), spec_bitmask=spec_mask,
                   spec_wanted=dict(d.get("spec_wanted") or {}))


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
    """What a step produced. A row without proposals samples one token (`sampled`,
    `logprobs`); a row with proposals emits its accepted proposals and the token after
    them (`spec_sampled`, 1..k+1 tokens, and `spec_logprobs` when it asked for logprobs),
    so it accepted len(spec_sampled[rid]) - 1. `spec_proposals`: a draft model's or EAGLE
    head's proposals for the next step of the rows the plan's spec_wanted named (their
    draft probabilities stay on the worker)."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Prompt logprobs for the prompt positions this step computed, in order.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    execute_time_s: Optional[float] = None
    spec_sampled: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    spec_proposals: dict[str, list[int]] = field(default_factory=dict)

    def to_wire(self) -> dict:
        d = {"sampled": self.sampled,
             "logprobs": {k: _lp_row(v) for k, v in self.logprobs.items()},
             "prompt_logprobs": {k: [_lp_row(x) for x in v] for k, v in self.prompt_logprobs.items()},
             "execute_time_s": self.execute_time_s}
        if self.spec_sampled:  # off the wire without speculation
            d["spec"] = (self.spec_sampled,
                         {k: [_lp_row(x) for x in v] for k, v in self.spec_logprobs.items()})
        if self.spec_proposals:
            d["spec_proposals"] = self.spec_proposals
        return d

    @classmethod
    def from_wire(cls, d: dict) -> "StepResult":
        spec, spec_lps = d.get("spec") or ({}, {})
        return cls(sampled=dict(d["sampled"]),
                   logprobs={k: TokenLogprobs(*v) for k, v in d["logprobs"].items()},
                   prompt_logprobs={k: [TokenLogprobs(*x) for x in v]
                                    for k, v in d["prompt_logprobs"].items()},
                   execute_time_s=d.get("execute_time_s"),
                   spec_sampled={k: list(v) for k, v in spec.items()},
                   spec_logprobs={k: [TokenLogprobs(*x) for x in v] for k, v in spec_lps.items()},
                   spec_proposals={k: list(v) for k, v in (d.get("spec_proposals") or {}).items()})


def _lp_row(t: TokenLogprobs) -> tuple:
    return (t.top_ids, t.top_logprobs, t.token_id, t.logprob, t.rank)
