"""Exact verification of speculative proposals: from the target's logits at each row's
last token and its k proposals (k + 1 positions), the accepted proposals and the one
token after them, so that the output is distributed exactly as decoding without
speculation.

Every position samples as `sampler.sample` would at that output position: penalties
and min_tokens see the proposals before it as outputs, a seeded request draws from
(seed, output position) alone. One-hot proposals (n-gram) are accepted exactly while
they equal the target's token there: token for token the output of plain decoding,
greedy or seeded (and rejection sampling's acceptance for a one-hot draft). Proposals
with draft probabilities q (draft model, EAGLE) go through rejection sampling: accept x
with probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q)); after k accepted
the bonus token is the target's own sample at position k.

`logits` rows are grouped per request: row i's positions 0..k_i (its last known token,
then each proposal) are consecutive, rows in order. The caller applies logits
processors (logit_bias, bad words, grammar masks) per position before calling, and
counts the emitted tokens as sampled afterwards (`state.num_sampled += len(tokens)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from raylm.kernels.sampling import seeded_exponential, seeded_uniform
from raylm.workers.logits_processors import process_logits
from raylm.workers.sampler import (SamplingState, _apply_penalties, _filter, batched_seeded_noise,
                                   draw_seed, sample, topk_logprobs)
from raylm.workers.transfer import to_device

# Keeps the acceptance draws of a seeded request apart from its sampling draws.
_VERIFY_SALT = 0x5DEECE66D


@dataclass
class VerifyResult:
    """Per row: `tokens` (its accepted proposals, then the target's token after them)
    and `num_accepted`. `positions` (long, on the logits' device) are the logits rows of
    every emitted token, rows in order, and `token_ids` those tokens, for logprobs."""

    tokens: list[list[int]]
    num_accepted: list[int]
    positions: torch.Tensor
    token_ids: torch.Tensor


def row_offsets(proposals: Sequence[Sequence[int]]) -> list[int]:
    """Index of each row's first position in the logits (its last known token)."""
    offsets, n = [], 0
    for p in proposals:
        offsets.append(n)
        n += len(p) + 1
    return offsets


def position_states(states: Sequence[SamplingState],
                    proposals: Sequence[Sequence[int]]) -> list[SamplingState]:
    """The sampling state at every verified position: row i's position j sees
    proposals[i][:j] as outputs and draws for output position num_sampled + j. Rows
    whose draws depend on neither (no penalties, not seeded) reuse their state."""
    out: list[SamplingState] = []
    for st, props in zip(states, proposals):
        if not st.has_penalties and (st.generator is None or st.is_greedy):
            out.extend([st] * (len(props) + 1))
            continue
        for j in range(len(props) + 1):
            s = object.__new__(SamplingState)
            s.__dict__.update(st.__dict__)
            if j and st.has_penalties:
                s.output_token_ids = list(st.output_token_ids) + list(props[:j])
            s.num_sampled = st.num_sampled + j
            out.append(s)
    return out


def _check(logits: torch.Tensor, states, proposals) -> list[int]:
    if len(states) != len(proposals):
        raise ValueError(f"{len(states)} sampling states for {len(proposals)} rows of proposals")
    offsets = row_offsets(proposals)
    n = offsets[-1] + len(proposals[-1]) + 1 if proposals else 0
    if logits.shape[0] != n:
        raise ValueError(f"logits have {logits.shape[0]} rows; the proposals need {n} "
                         f"(each row's k proposals + 1)")
    return offsets


def _result(logits, proposals, offsets, chosen: list[list[int]], accepted: list[int]) -> VerifyResult:
    tokens, positions = [], []
    for i, props in enumerate(proposals):
        a = accepted[i]
        tokens.append(list(props[:a]) + [chosen[i][a]])
        positions.extend(range(offsets[i], offsets[i] + a + 1))
    flat = [t for row in tokens for t in row]
    return VerifyResult(tokens, accepted, to_device(positions, torch.long, logits.device),
                        to_device(flat, torch.long, logits.device))


def verify_one_hot(logits: torch.Tensor, states: Sequence[SamplingState],
                   proposals: Sequence[Sequence[int]],
                   default_generator: Optional[torch.Generator] = None) -> VerifyResult:
    """One-hot proposals (n-gram): the target samples at every position as the sampler
    would; proposal j is accepted while it equals the token sampled at position j.
    `logits`: float32 [sum(k_i + 1), V]."""
    offsets = _check(logits, states, proposals)
    targets = sample(logits, position_states(states, proposals), default_generator).tolist()
    chosen, accepted = [], []
    for i, props in enumerate(proposals):
        row = targets[offsets[i]:offsets[i] + len(props) + 1]
        a = 0
        while a < len(props) and props[a] == row[a]:
            a += 1
        chosen.append(row)
        accepted.append(a)
    return _result(logits, proposals, offsets, chosen, accepted)


def target_probs(logits: torch.Tensor, pstates: Sequence[SamplingState]) -> torch.Tensor:
    """The distribution the sampler draws from at each position (penalties, temperature,
    top-k/top-p/min-p; one-hot at the argmax for greedy rows)."""
    if any(st.has_penalties for st in pstates):
        logits = _apply_penalties(logits.clone(), list(pstates))
    probs = _filter(logits, list(pstates)).softmax(dim=1)
    greedy = [i for i, st in enumerate(pstates) if st.is_greedy]
    if greedy:
        idx = to_device(greedy, torch.long, logits.device)
        onehot = torch.zeros(len(greedy), logits.shape[1], dtype=probs.dtype, device=probs.device)
        probs[idx] = onehot.scatter_(1, logits[idx].argmax(dim=1, keepdim=True), 1.0)
    return probs


def _acceptance_noise(states, proposals, num: int, vocab: int, device,
                      default_generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per proposal: a uniform u for the acceptance test and Exp(1) noise over the vocabulary
    for a residual draw. A seeded row's draws at output position p depend only on (seed, p):
    on CUDA every seeded u in one launch and every noise row in another, keyed by (seed, p),
    u at the Philox counter just past the noise's (so independent of it); on the CPU from
    the row's generator re-seeded for (seed, p). Unseeded rows draw from `default_generator`,
    and only they (a batch of seeded rows draws nothing it overwrites)."""
    rows, keys, gens = [], [], []
    g = 0
    for st, props in zip(states, proposals):
        if st.generator is not None and not st.is_greedy:
            for j in range(len(props)):
                rows.append(g + j)
                keys.append(draw_seed(st.options.seed ^ _VERIFY_SALT, st.num_sampled + j))
                gens.append(st.generator)
        g += len(props)
    if not rows:
        u = torch.rand(num, device=device, generator=default_generator)
        noise = torch.empty(num, vocab, device=device).exponential_(generator=default_generator)
        return u, noise
    u = torch.empty(num, device=device)
    noise = torch.empty(num, vocab, device=device)
    seeded = set(rows)
    free = [r for r in range(num) if r not in seeded]
    if free:
        idx = to_device(free, torch.long, noise.device)
        u[idx] = torch.rand(len(free), device=device, generator=default_generator)
        noise[idx] = torch.empty(len(free), vocab, device=device).exponential_(generator=default_generator)
    if rows and batched_seeded_noise(noise.device):
        idx = to_device(rows, torch.long, noise.device)
        u[idx] = seeded_uniform(keys, 1, noise.device, counter=vocab)[:, 0]
        noise[idx] = seeded_exponential(keys, vocab, noise.device)
        return u, noise
    for r, key, gen in zip(rows, keys, gens):
        gen.manual_seed(key)
        u[r] = torch.rand(1, device=device, generator=gen)[0]
        noise[r].exponential_(generator=gen)
    return u, noise


def verify_rejection(logits: torch.Tensor, states: Sequence[SamplingState],
                     proposals: Sequence[Sequence[int]], draft_probs: torch.Tensor,
                     default_generator: Optional[torch.Generator] = None) -> VerifyResult:
    """Proposals drawn from a draft distribution q (`draft_probs`, float32 [sum k_i, V],
    the proposals' rows in order): rejection sampling, so every emitted token is
    distributed as the target's. `logits`: float32 [sum(k_i + 1), V]."""
    offsets = _check(logits, states, proposals)
    num = sum(len(p) for p in proposals)
    if draft_probs.shape != (num, logits.shape[1]):
        raise ValueError(f"draft_probs has shape {tuple(draft_probs.shape)}; the proposals need "
                         f"({num}, {logits.shape[1]})")
    pstates = position_states(states, proposals)
    # The token after the last accepted proposal, when all are: the target's own sample.
    plain = sample(logits, pstates, default_generator).tolist()
    if num == 0:
        return _result(logits, proposals, offsets, [[t] for t in plain], [0] * len(proposals))
    dev = logits.device
    spec_pos = [offsets[i] + j for i, p in enumerate(proposals) for j in range(len(p))]
    p = target_probs(logits, pstates)[to_device(spec_pos, torch.long, dev)]
    q = draft_probs.to(p.dtype)
    x = to_device([t for props in proposals for t in props], torch.long, dev).view(-1, 1)
    u, noise = _acceptance_noise(states, proposals, num, logits.shape[1], dev, default_generator)
    accept = (u * q.gather(1, x).squeeze(1) < p.gather(1, x).squeeze(1)).tolist()
    residual = (p - q).clamp_(min=0)
    empty = residual.sum(dim=1, keepdim=True) <= 0  # p == q: rejection has probability 0
    residual = torch.where(empty, p, residual)
    recovered = (residual.log() - noise.log()).argmax(dim=1).tolist()
    chosen, accepted, g = [], [], 0
    for i, props in enumerate(proposals):
        a = 0
        while a < len(props) and accept[g + a]:
            a += 1
        row = [recovered[g + j] for j in range(len(props))] + [plain[offsets[i] + len(props)]]
        chosen.append(row)
        accepted.append(a)
        g += len(props)
    return _result(logits, proposals, offsets, chosen, accepted)


def emitted_logprobs(raw_logits: torch.Tensor, result: VerifyResult, k: int):
    """Logprobs of every emitted token (the raw log-softmax, as the sampler reports), in
    `result.positions` order: (top-k ids, top-k logprobs, chosen logprob, chosen rank)."""
    lp = torch.log_softmax(raw_logits[result.positions], dim=-1)
    return topk_logprobs(lp, result.token_ids, k)


def process_positions(logits: torch.Tensor, states: Sequence[SamplingState],
                      proposals: Sequence[Sequence[int]], rows: Sequence[int],
                      mask_rows: Sequence[int] = (), bitmask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of `logits` with the logits processors (logit_bias, allowed_token_ids,
    bad_words) of rows `rows` applied at each of their positions, position j seeing the
    row's proposals before it as outputs (a bad word may end inside the proposals), and
    the grammar bitmasks of rows `mask_rows`: `bitmask` holds k_i + 1 rows per such row
    (its state before each proposal, then after all), rows in mask_rows' order."""
    offsets = row_offsets(proposals)
    mask_pos = [offsets[i] + j for i in mask_rows for j in range(len(proposals[i]) + 1)]
    if bitmask is not None and bitmask.shape[0] != len(mask_pos):
        raise ValueError(f"{bitmask.shape[0]} grammar bitmasks for {len(mask_pos)} verified positions")
    pos, options, outputs = [], [], []
    for i in rows:
        st, props = states[i], proposals[i]
        for j in range(len(props) + 1):
            pos.append(offsets[i] + j)
            options.append(st.options)
            outputs.append(list(st.output_token_ids) + list(props[:j]) if j else st.output_token_ids)
    return process_logits(logits, pos, options, outputs, mask_pos, bitmask)
