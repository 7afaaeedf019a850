"""Edits of a batch's logits that come before penalties and temperature: OpenAI's
`logit_bias` (added first), vLLM's `allowed_token_ids` and `bad_words`, and the
structured-output grammar's next-token bitmask. Each is one batched tensor op over the
rows that use it; rows that use none are not visited (the caller passes only the rows
of requests that set an option, and a bitmask only for grammar rows)."""
from __future__ import annotations

from typing import Optional

import torch

from raylm.kernels.bitmask import apply_token_bitmask
from raylm.workers.messages import SamplingOptions
from raylm.workers.transfer import to_device

_NEG_INF = float("-inf")


def uses_processors(o: SamplingOptions) -> bool:
    """True when the request sets logit_bias, allowed_token_ids or bad_words."""
    return bool(o.logit_bias) or o.allowed_token_ids is not None or bool(o.bad_words_token_ids)


def unpack_bitmask(packed, num_rows: int, device: torch.device) -> torch.Tensor:
    """StepPlan.bitmask (bytes, or an int32 CPU tensor from an engine in this process)
    -> int32 [num_rows, words] on `device`. On CUDA through page-locked memory: a copy
    from pageable memory would make the host wait for everything queued on the GPU first
    (the forward pass in flight, with asynchronous scheduling)."""
    if isinstance(packed, torch.Tensor):
        words = packed.view(num_rows, -1)
        if device.type != "cuda":
            return words
        if words.is_pinned():
            return words.to(device, non_blocking=True)
    else:
        words = torch.frombuffer(bytearray(packed), dtype=torch.int32).view(num_rows, -1)
        if device.type != "cuda":
            return words
    pinned = torch.empty(words.shape, dtype=torch.int32, pin_memory=True)
    pinned.copy_(words)
    return pinned.to(device, non_blocking=True)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every token that row `rows[i]`'s bitmask (row i of the
    int32 [k, ceil(V/32)] `bitmask`) does not allow; tokens past the bitmask are banned.
    One Triton launch on CUDA (raylm.kernels.bitmask), its torch reference elsewhere."""
    apply_token_bitmask(logits, rows, bitmask)


def apply_processors(logits: torch.Tensor, rows: list[int], options: list[SamplingOptions],
                     outputs: list[list[int]]) -> None:
    """In place, for row `rows[i]` with options `options[i]` and output tokens so far
    `outputs[i]`: add its logit_bias, ban all but its allowed_token_ids, and ban each
    bad word's last token where the outputs end with the word's other tokens (vLLM's
    semantics; a one-token bad word is always banned)."""
    vocab = logits.shape[1]
    bias_r, bias_t, bias_v, ban_r, ban_t = [], [], [], [], []
    allowed_rows, allowed = [], []
    for r, o, out in zip(rows, options, outputs):
        if o.logit_bias:
            for t, v in o.logit_bias:
                if t < vocab:
                    bias_r.append(r)
                    bias_t.append(t)
                    bias_v.append(v)
        if o.allowed_token_ids is not None:
            allowed_rows.append(r)
            allowed.append([t for t in o.allowed_token_ids if t < vocab])
        for word in o.bad_words_token_ids or ():
            *prefix, last = word
            if last < vocab and (not prefix or out[len(out) - len(prefix):] == prefix):
                ban_r.append(r)
                ban_t.append(last)
    dev = logits.device
    if bias_r:
        logits.index_put_((to_device(bias_r, torch.long, dev), to_device(bias_t, torch.long, dev)),
                          to_device(bias_v, logits.dtype, dev), accumulate=True)
    if allowed_rows:
        keep = torch.zeros(len(allowed_rows), vocab, dtype=torch.bool, device=dev)
        k_r = [i for i, ids in enumerate(allowed) for _ in ids]
        k_t = [t for ids in allowed for t in ids]
        keep[to_device(k_r, torch.long, dev), to_device(k_t, torch.long, dev)] = True
        idx = to_device(allowed_rows, torch.long, dev)
        logits[idx] = logits[idx].masked_fill(~keep, _NEG_INF)
    if ban_r:
        logits[to_device(ban_r, torch.long, dev), to_device(ban_t, torch.long, dev)] = _NEG_INF


def process_logits(logits: torch.Tensor, proc_rows: list[int], options: list[SamplingOptions],
                   outputs: list[list[int]], mask_rows: list[int],
                   bitmask: Optional[torch.Tensor]) -> torch.Tensor:
    """A copy of `logits` with the processors of `proc_rows` and the grammar bitmask of
    `mask_rows` applied (the caller keeps the raw logits for log-probabilities)."""
    logits = logits.clone()
    if proc_rows:
        apply_processors(logits, proc_rows, options, outputs)
    if mask_rows:
        apply_bitmask(logits, mask_rows, bitmask)
    return logits
