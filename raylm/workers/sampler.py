"""Turning logits into tokens, per request: penalties, temperature, top-k/top-p/min-p,
seeded sampling, and the raw log-probabilities users ask for.

Reported log-probabilities are the model's raw log-softmax, before temperature or
penalties (as vLLM reports them). Each seeded request draws from its own generator, so
its tokens do not depend on what else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from raylm.workers.messages import SamplingOptions
from raylm.workers.transfer import to_device


@dataclass
class SamplingState:
    """What the worker keeps per request between steps."""

    prompt_token_ids: list[int]
    options: SamplingOptions
    output_token_ids: list[int] = field(default_factory=list)
    generator: Optional[torch.Generator] = None

    def __post_init__(self) -> None:
        o = self.options
        self.is_greedy = o.temperature < 1e-5
        self.has_penalties = (o.repetition_penalty != 1.0 or o.presence_penalty != 0.0
                              or o.frequency_penalty != 0.0 or o.min_tokens > 0)


def topk_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int):
    """For each row, as tensors on the logits' device: (top-k ids, top-k logprobs, chosen
    logprob, chosen 1-based rank)."""
    chosen_lp = logprobs.gather(1, chosen.view(-1, 1)).squeeze(1)
    ranks = (logprobs > chosen_lp.unsqueeze(1)).sum(1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=1)
    else:
        top_lp = torch.empty(logprobs.shape[0], 0, device=logprobs.device)
        top_ids = torch.empty(logprobs.shape[0], 0, dtype=torch.long, device=logprobs.device)
    return top_ids, top_lp, chosen_lp, ranks


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    for i, st in enumerate(states):
        if not st.has_penalties:
            continue
        o = st.options
        rep, pres, freq = o.repetition_penalty, o.presence_penalty, o.frequency_penalty
        row = logits[i]
        if rep != 1.0:
            seen = to_device(sorted(set(st.prompt_token_ids) | set(st.output_token_ids)),
                             torch.long, logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / rep, vals * rep)
        if (pres or freq) and st.output_token_ids:
            out = to_device(st.output_token_ids, torch.long, logits.device)
            counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
            row -= freq * counts + pres * (counts > 0).to(row.dtype)
        if o.min_tokens and len(st.output_token_ids) < o.min_tokens:
            banned = list(o.stop_token_ids)
            if not o.ignore_eos:
                banned += o.eos_token_ids
            banned = [t for t in banned if 0 <= t < row.shape[0]]
            if banned:
                row[banned] = float("-inf")
    return logits


def _filter(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (each a no-op at its default)."""
    temps = [max(st.options.temperature, 1e-5) for st in states]
    if all(t == temps[0] for t in temps):
        logits = logits / temps[0]
    else:
        logits = logits / to_device(temps, logits.dtype, logits.device).unsqueeze(1)
    vocab = logits.shape[1]
    top_k = [st.options.top_k for st in states]
    if any(0 < k < vocab for k in top_k):
        ks = to_device([k if 0 < k < vocab else vocab for k in top_k], torch.long, logits.device)
        sorted_logits = logits.sort(dim=1, descending=True).values
        kth = sorted_logits.gather(1, (ks - 1).view(-1, 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = [st.options.top_p for st in states]
    if any(p < 1.0 for p in top_p):
        ps = to_device(top_p, logits.dtype, logits.device)
        probs_sorted, idx = logits.softmax(dim=1).sort(dim=1, descending=True)
        cum = probs_sorted.cumsum(dim=1)
        remove_sorted = (cum - probs_sorted) >= ps.unsqueeze(1)  # keep the smallest set reaching p
        remove = torch.zeros_like(remove_sorted).scatter(1, idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    min_p = [st.options.min_p for st in states]
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=1)
        thresh = to_device(min_p, probs.dtype, probs.device).unsqueeze(1) \
            * probs.max(dim=1, keepdim=True).values
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def sample(logits: torch.Tensor, states: list[SamplingState],
           default_generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of `logits` (float32, [B, V])."""
    if any(st.has_penalties for st in states):
        logits = _apply_penalties(logits.clone(), states)
    if all(st.is_greedy for st in states):
        return logits.argmax(dim=1)
    scaled = _filter(logits, states)
    # Exponential race: argmax p/q with q ~ Exp(1) draws from p = softmax(scaled); in logs,
    # argmax(scaled - log q), which needs no softmax. One generator per seeded request
    # keeps its draws independent of the batch; unseeded rows share one batched draw.
    q = torch.empty_like(scaled).exponential_(generator=default_generator)
    for i, st in enumerate(states):
        if st.generator is not None and not st.is_greedy:
            q[i].exponential_(generator=st.generator)
    sampled = (scaled - q.log_()).argmax(dim=1)
    if not any(st.is_greedy for st in states):
        return sampled
    greedy = to_device([st.is_greedy for st in states], torch.bool, logits.device)
    return torch.where(greedy, logits.argmax(dim=1), sampled)
