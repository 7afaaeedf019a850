"""A step launched on the device whose results are still on their way to the host
(ModelRunner.launch), and turning it into a StepResult once they arrive."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from raylm.workers.messages import StepResult, TokenLogprobs


@dataclass
class PendingStep:
    """A launched step (ModelRunner.launch): its sampled tokens and log-probabilities are
    being copied to the host; `collect_step` waits for them."""

    result: StepResult
    t0: float
    sample_ids: list = field(default_factory=list)
    states: list = field(default_factory=list)
    tokens: Optional[torch.Tensor] = None
    want: list = field(default_factory=list)  # rows of sample_ids that asked for logprobs
    logprobs: Optional[tuple] = None  # (top ids, top logprobs, chosen logprob, rank)
    prompt_rows: list = field(default_factory=list)
    prompt_logprobs: Optional[tuple] = None
    event: Optional[object] = None  # torch.cuda.Event after the copies
    # Rows with proposals (verified at launch): their emitted tokens, and the logprobs of
    # every emitted token in order when any of them asked.
    spec_ids: list = field(default_factory=list)
    spec_states: list = field(default_factory=list)
    spec_tokens: list = field(default_factory=list)
    spec_logprobs: Optional[tuple] = None
    # launch(defer_sampling=True): what finish_sampling needs to queue the sampling.
    deferred: Optional[tuple] = None
    # ModelRunner.gpu_trace: timing events (forward start, logits done, sampling start and
    # end) of this step, read when it is collected.
    trace: Optional[dict] = None
    # Model-based speculation: (the rows' query starts, the target's aux hidden states).
    spec_ctx: Optional[tuple] = None


def collect_step(pending: PendingStep) -> StepResult:
    """Wait for a launched step's results and return them as a StepResult."""
    result = pending.result
    if pending.event is not None:
        pending.event.synchronize()
    if pending.tokens is not None:
        tokens = pending.tokens.tolist()
        if pending.logprobs is not None:
            ids, lps, chosen, ranks = (t.tolist() for t in pending.logprobs)
            for j, i in enumerate(pending.want):
                ki = pending.states[i].options.logprobs
                result.logprobs[pending.sample_ids[i]] = TokenLogprobs(
                    ids[j][:ki], lps[j][:ki], tokens[i], chosen[j], ranks[j])
        for rid, st, tok in zip(pending.sample_ids, pending.states, tokens):
            st.output_token_ids.append(tok)
            result.sampled[rid] = tok
    if pending.spec_ids:
        _collect_spec(pending, result)
    if pending.prompt_logprobs is not None:
        ids, lps, chosen, ranks = (t.tolist() for t in pending.prompt_logprobs)
        for j, (rid, tgt, ki) in enumerate(pending.prompt_rows):
            result.prompt_logprobs.setdefault(rid, []).append(
                TokenLogprobs(ids[j][:ki], lps[j][:ki], tgt, chosen[j], ranks[j]))
    result.execute_time_s = time.perf_counter() - pending.t0
    return result


def _collect_spec(pending: PendingStep, result: StepResult) -> None:
    lps = None if pending.spec_logprobs is None else [t.tolist() for t in pending.spec_logprobs]
    g = 0
    for rid, st, tokens in zip(pending.spec_ids, pending.spec_states, pending.spec_tokens):
        st.output_token_ids.extend(tokens)
        result.spec_sampled[rid] = tokens
        ki = st.options.logprobs
        if lps is not None and ki is not None:
            ids, top, chosen, ranks = lps
            result.spec_logprobs[rid] = [TokenLogprobs(ids[g + j][:ki], top[g + j][:ki], tok,
                                                       chosen[g + j], ranks[g + j])
                                         for j, tok in enumerate(tokens)]
        g += len(tokens)
