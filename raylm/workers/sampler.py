"""Turning logits into tokens, per request: penalties, temperature, top-k/top-p/min-p,
seeded sampling, and the raw log-probabilities users ask for.

Reported log-probabilities are the model's raw log-softmax, before temperature or
penalties (as vLLM reports them). A seeded request's draw for its token at output
position p depends only on (seed, p): its generator is re-seeded with a mix of the two
before each draw, so its tokens depend neither on what else shares the batch, nor on
asynchronous scheduling, nor on which worker group sampled its earlier tokens (a request
re-dispatched by recompute after its group failed continues exactly as it would have).
On CUDA every seeded row's noise comes from one kernel launch keyed by that mix
(`raylm.kernels.sampling`), not one re-seeded generator call per row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from raylm.kernels.sampling import seeded_exponential, top_k_top_p_filter, top_k_top_p_filter_reference
from raylm.workers.messages import SamplingOptions
from raylm.workers.transfer import to_device

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw at output `position`: output
    position+1 of splitmix64 seeded with `seed`. Two (seed, position) pairs that collide
    (likelier on the CPU, whose generator keeps 32 bits of a seed) merely reuse a draw:
    harmless for sampling."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# Tests set this to run CUDA's batched path on the CPU (with Triton's interpreter on, the
# kernel's; else its reference). Not the interpreter alone: test files turn it on for the
# whole session, and the CPU's seeded draws must stay the generators'.
BATCHED_ON_CPU = False


def batched_seeded_noise(device: torch.device) -> bool:
    """Whether seeded rows draw their noise in one batched call keyed by `draw_seed`
    (`seeded_exponential`: on CUDA) rather than each from its re-seeded torch.Generator
    (the CPU's draws, as always)."""
    return device.type == "cuda" or BATCHED_ON_CPU


def seeded_noise_rows(noise: torch.Tensor, rows: list[int], keys: list[int], generators: list) -> None:
    """In place: row rows[i] of `noise` gets the Exp(1) draws keyed by keys[i], all rows
    from one launch where `batched_seeded_noise`, else each from generators[i] re-seeded
    with its key."""
    if rows and batched_seeded_noise(noise.device):
        draws = seeded_exponential(keys, noise.shape[1], noise.device)
        noise[to_device(rows, torch.long, noise.device)] = draws.to(noise.dtype)
        return
    for r, key, gen in zip(rows, keys, generators):
        gen.manual_seed(key)
        noise[r].exponential_(generator=gen)


@dataclass
class SamplingState:
    """What the worker keeps per request between steps. `output_token_ids` are the
    outputs so far, as collected (`collect_step` appends each step's token); `num_sampled`
    also counts the tokens of launched steps not yet collected (`ModelRunner.launch`
    counts each row it samples): it is the output position of the next token drawn."""

    prompt_token_ids: list[int]
    options: SamplingOptions
    output_token_ids: list[int] = field(default_factory=list)
    generator: Optional[torch.Generator] = None  # seeded requests: re-seeded per draw

    def __post_init__(self) -> None:
        o = self.options
        self.is_greedy = o.temperature < 1e-5
        self.has_penalties = (o.repetition_penalty != 1.0 or o.presence_penalty != 0.0
                              or o.frequency_penalty != 0.0 or o.min_tokens > 0)
        self.num_sampled = len(self.output_token_ids)

    @classmethod
    def of_request(cls, token_ids: list[int], options: SamplingOptions,
                   device: torch.device) -> "SamplingState":
        """A new request's state: the last `options.output_offset` of its `token_ids` are
        outputs generated earlier (elsewhere), the rest its prompt."""
        k = options.output_offset
        if not 0 <= k <= len(token_ids):
            raise ValueError(f"output_offset is {k}; the request has {len(token_ids)} tokens "
                             f"(prompt and earlier outputs), so it must be in [0, {len(token_ids)}]")
        split = len(token_ids) - k
        gen = torch.Generator(device=device) if options.seed is not None else None
        return cls(list(token_ids[:split]), options, list(token_ids[split:]), gen)


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
        if o.min_tokens and st.num_sampled < o.min_tokens:
            banned = list(o.stop_token_ids)
            if not o.ignore_eos:
                banned += o.eos_token_ids
            banned = [t for t in banned if 0 <= t < row.shape[0]]
            if banned:
                row[banned] = float("-inf")
    return logits


# When every row's top-k is at most this, top-k and top-p work on torch.topk's candidates
# instead of the whole vocabulary (Qwen3's generation config asks top_k 20); otherwise a
# Triton kernel searches each row's thresholds without a sort (CUDA), and the CPU sorts.
TOP_K_CANDIDATES_MAX = 1024
# Tests set this to run that kernel on the CPU too (under Triton's interpreter); otherwise
# the CPU sorts, even while test files keep the interpreter on for the whole session.
FILTER_KERNEL_ON_CPU = False


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Top-k then top-p masks (`kernels.sampling.top_k_top_p_filter` says what each keeps:
    ties at a threshold stay). From torch.topk's max(k) candidates when every row has a
    small k (top-k masks the rest anyway), else from the kernel or a sort. Top-p uses the
    row's own softmax after top-k; a row's tokens never depend on its neighbours' settings."""
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    need_k, need_p = any(k < vocab for k in ks), any(p < 1.0 for p in top_p)
    if not (need_k or need_p):
        return logits
    width = max(ks)
    if width > TOP_K_CANDIDATES_MAX:
        if logits.device.type == "cuda" or FILTER_KERNEL_ON_CPU:
            return top_k_top_p_filter(logits, ks, top_p)
        return top_k_top_p_filter_reference(logits, ks, top_p)
    vals, idx = logits.topk(width, dim=1)
    if need_k:
        kth = vals.gather(1, to_device([k - 1 for k in ks], torch.long, logits.device).view(-1, 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if need_p:
        ps = to_device(top_p, logits.dtype, logits.device)
        probs = logits.softmax(dim=1).gather(1, idx)
        # The smallest most-likely set reaching p, and every token as likely as its least
        # likely one; rows at p = 1 keep all (the sum may round to 1 before the tail).
        remove = ((probs.cumsum(dim=1) - probs) >= ps.unsqueeze(1)) & (ps < 1.0).unsqueeze(1)
        least_kept = vals.masked_fill(remove, float("inf")).min(dim=1, keepdim=True).values
        logits = logits.masked_fill(logits < least_kept, float("-inf"))
    return logits


def _scaled(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Each row over its temperature (a greedy row's clamped: its token is the argmax)."""
    temps = [max(st.options.temperature, 1e-5) for st in states]
    if all(t == temps[0] for t in temps):
        return logits / temps[0]
    return logits / to_device(temps, logits.dtype, logits.device).unsqueeze(1)


def _filter(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (each a no-op at its default)."""
    logits = _scaled(logits, states)
    logits = _top_k_top_p(logits, [st.options.top_k for st in states], [st.options.top_p for st in states])
    min_p = [st.options.min_p for st in states]
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=1)
        thresh = to_device(min_p, probs.dtype, probs.device).unsqueeze(1) \
            * probs.max(dim=1, keepdim=True).values
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


_FLASHINFER_SAMPLING: list = []  # [module or None], imported once


def flashinfer_sampling(device: torch.device):
    """FlashInfer's sampling module where it draws for us: on CUDA with flashinfer
    installed, unless RAYLM_USE_FLASHINFER_SAMPLER=0 (vLLM's VLLM_USE_FLASHINFER_SAMPLER).
    Its sort-free top-k / top-p draw beat ours on an H100 at batch 256 and a 152k
    vocabulary (0.29 against 2.09 ms at Qwen3's top_k 20 / top_p 0.95, 0.60 against
    3.63 ms at top_p 0.9: benchmarks/sampling.py)."""
    if device.type != "cuda" or os.environ.get("RAYLM_USE_FLASHINFER_SAMPLER", "1") == "0":
        return None
    if not _FLASHINFER_SAMPLING:
        try:
            import flashinfer.sampling as module
        except ImportError:
            module = None
        _FLASHINFER_SAMPLING.append(module)
    return _FLASHINFER_SAMPLING[0]


def _flashinfer_draw(fi, logits: torch.Tensor, states: list[SamplingState],
                     default_generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """The batch's draw by FlashInfer's top_k_top_p_sampling_from_logits (top-k, then top-p
    of what is left, as `_filter` orders them), when it can stand for ours: some row asks
    top-k or top-p, no row is seeded (a seeded row's draw must not depend on its batch)
    and none asks min-p. None otherwise."""
    vocab = logits.shape[1]
    ks = [st.options.top_k if 0 < st.options.top_k < vocab else vocab for st in states]
    ps = [st.options.top_p for st in states]
    if not (any(k < vocab for k in ks) or any(p < 1.0 for p in ps)):
        return None
    if any(st.generator is not None or st.options.min_p > 0 for st in states if not st.is_greedy):
        return None
    return fi.top_k_top_p_sampling_from_logits(
        _scaled(logits, states), to_device(ks, torch.int32, logits.device), to_device(ps, torch.float32, logits.device),
        filter_apply_order="top_k_first", deterministic=True, generator=default_generator).long()


def sample(logits: torch.Tensor, states: list[SamplingState],
           default_generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of `logits` (float32, [B, V]). A seeded row draws for output
    position `num_sampled`; the caller counts the row as sampled afterwards."""
    if any(st.has_penalties for st in states):
        logits = _apply_penalties(logits.clone(), states)
    if all(st.is_greedy for st in states):
        return logits.argmax(dim=1)
    fi = flashinfer_sampling(logits.device)
    sampled = None if fi is None else _flashinfer_draw(fi, logits, states, default_generator)
    if sampled is not None:
        if not any(st.is_greedy for st in states):
            return sampled
        greedy = to_device([st.is_greedy for st in states], torch.bool, logits.device)
        return torch.where(greedy, logits.argmax(dim=1), sampled)
    scaled = _filter(logits, states)
    # Exponential race: argmax p/q with q ~ Exp(1) draws from p = softmax(scaled); in logs,
    # argmax(scaled - log q), which needs no softmax. Unseeded rows share one batched draw;
    # a seeded row's q is keyed by (seed, position): all such rows from one kernel launch
    # (CUDA), or each from its generator re-seeded for them (CPU).
    seeded = [i for i, st in enumerate(states) if st.generator is not None and not st.is_greedy]
    if len(seeded) < sum(not st.is_greedy for st in states):
        q = torch.empty_like(scaled).exponential_(generator=default_generator)
    else:
        q = torch.empty_like(scaled)  # every sampling row seeded; greedy rows ignore q
    seeded_noise_rows(q, seeded, [draw_seed(states[i].options.seed, states[i].num_sampled) for i in seeded],
                      [states[i].generator for i in seeded])
    sampled = (scaled - q.log_()).argmax(dim=1)
    if not any(st.is_greedy for st in states):
        return sampled
    greedy = to_device([st.is_greedy for st in states], torch.bool, logits.device)
    return torch.where(greedy, logits.argmax(dim=1), sampled)
