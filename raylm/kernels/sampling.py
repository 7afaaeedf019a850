"""Seeded random numbers for sampling, every row in one launch: row i of the output
depends only on its 64-bit key keys[i] (a seeded request's key for one draw) and the
column, so a row is the same whatever shares the batch and in whatever order.

Uniform u at counter c of key k is Triton's `tl.rand(k, c)` (Philox4x32-10); the Exp(1)
noise of the exponential race is -log1p(-u), from log as Goldberg computes log1p (-log(w)
* u / (1 - w) with w = 1 - u rounded; u itself where w rounds to 1), and never below
2**-32 (u = 0 stands for the bin [0, 2**-31)). Plain -log(1 - u) in float32 is 0 for
u < 2**-25, about one element a step at 256 rows x 150k: a noise of 0 forces its token,
even a masked one (-inf - log 0 is NaN, which argmax picks). The references compute the
same Philox in int64 torch ops on the CPU: the uniforms bit for bit, the noise up to
float32 rounding of the log.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from raylm.kernels.interpret import runs_kernel
from raylm.kernels.transfer import to_device


@triton.jit
def _seeded_noise_kernel(keys_ptr, out_ptr, stride_o, n_cols, counter_start,
                         EXPONENTIAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    key = tl.load(keys_ptr + row)
    u = tl.rand(key, cols + counter_start)
    if EXPONENTIAL:
        w = 1.0 - u
        d = 1.0 - w  # exact: u as w kept it; 0 where 1 - u rounded to 1
        noise = -tl.log(w) * (u / tl.maximum(d, 2.0 ** -32))
        u = tl.where(d == 0.0, tl.maximum(u, 2.0 ** -32), noise)
    tl.store(out_ptr + row * stride_o + cols, u, mask=mask)


def _as_int64(keys: Sequence[int]) -> list[int]:
    """uint64 keys as the int64 with the same bits."""
    for k in keys:
        if not 0 <= k < 1 << 64:
            raise ValueError(f"key is {k}; keys must be in [0, 2**64)")
    return [k - (1 << 64) if k >= 1 << 63 else k for k in keys]


def _launch(keys: Sequence[int], n_cols: int, counter: int, exponential: bool, device) -> torch.Tensor:
    device = torch.device(device)
    cuda = device.type == "cuda"
    k = torch.tensor(_as_int64(keys), dtype=torch.int64, pin_memory=cuda).to(device, non_blocking=True)
    out = torch.empty(len(keys), n_cols, dtype=torch.float32, device=device)
    if len(keys) and n_cols:
        # The interpreter pays per program, not per element: whole rows up to 64k there.
        block = min(triton.next_power_of_2(n_cols), 1024 if cuda else 1 << 16)
        _seeded_noise_kernel[(len(keys), triton.cdiv(n_cols, block))](
            k, out, out.stride(0), n_cols, counter, EXPONENTIAL=exponential, BLOCK=block, num_warps=4)
    return out


def seeded_uniform(keys: Sequence[int], n_cols: int, device, counter: int = 0) -> torch.Tensor:
    """float32 [len(keys), n_cols] in [0, 1): row i holds key keys[i]'s uniforms at Philox
    counters counter .. counter + n_cols - 1. Keys are uint64 values."""
    if runs_kernel(device):
        return _launch(keys, n_cols, counter, False, device)
    return seeded_uniform_reference(keys, n_cols, counter).to(device)


def seeded_exponential(keys: Sequence[int], vocab: int, device, counter: int = 0) -> torch.Tensor:
    """float32 [len(keys), vocab] of Exp(1) noise, > 0 and finite: -log1p(-u) of the
    uniforms at counters counter .. counter + vocab - 1 (`seeded_uniform`), in one launch
    for all rows."""
    if runs_kernel(device):
        return _launch(keys, vocab, counter, True, device)
    return seeded_exponential_reference(keys, vocab, counter).to(device)


# ---- the reference: Triton's Philox (triton/language/random.py) in int64 torch ops ----
_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_SCALE = torch.tensor(4.6566127342e-10, dtype=torch.float32)  # uint_to_uniform_float's, for 32 bits


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * x for a and x in [0, 2**32), in int64 ops that never
    overflow: x in 16-bit halves."""
    t = a * (x & 0xFFFF)
    mid = a * (x >> 16) + (t >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t & 0xFFFF)


def philox_reference(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """int64 [n, m]: the first 32-bit word (what tl.randint returns) of Philox4x32-10 for
    key keys[i] (int64 holding the uint64 seed: low word k0, high word k1) and state
    (counters[j], 0, 0, 0), as Triton computes it."""
    k0 = (keys & _M32).view(-1, 1)
    k1 = ((keys >> 32) & _M32).view(-1, 1)
    c0 = (counters & _M32).view(1, -1)
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0.expand(len(keys), len(counters))


def seeded_uniform_reference(keys: Sequence[int], n_cols: int, counter: int = 0) -> torch.Tensor:
    """`seeded_uniform` on the CPU, bit for bit: uint_to_uniform_float of the Philox word."""
    k = torch.tensor(_as_int64(keys), dtype=torch.int64)
    out = torch.empty(len(keys), n_cols, dtype=torch.float32)
    rows = max(1, (1 << 22) // max(n_cols, 1))  # a few million elements at a time
    counters = torch.arange(counter, counter + n_cols, dtype=torch.int64)
    for start in range(0, len(keys), rows):
        x = philox_reference(k[start:start + rows], counters)
        x = torch.where(x >= 1 << 31, x - (1 << 32), x)  # the word as int32
        x = torch.where(x < 0, -x - 1, x)
        out[start:start + rows] = x.to(torch.int32).to(torch.float32) * _SCALE
    return out


def seeded_exponential_reference(keys: Sequence[int], vocab: int, counter: int = 0) -> torch.Tensor:
    """`seeded_exponential` on the CPU: the same uniforms and float32 operations."""
    u = seeded_uniform_reference(keys, vocab, counter)
    w = 1.0 - u
    d = 1.0 - w
    noise = -torch.log(w) * (u / d.clamp_min(2.0 ** -32))
    return torch.where(d == 0, u.clamp_min(2.0 ** -32), noise)


# ---- top-k and top-p without a sort ---------------------------------------------------
# A float32 x maps to an int32 key in the same order (negative floats: magnitude bits
# flipped), so "the largest threshold whose tokens at or above it reach k tokens (top-k) or
# p of the mass (top-p)" is a search over keys: each pass over the row sums the weights
# (1 for top-k, exp(x - max) for top-p) at or above NT evenly spaced candidate keys and
# keeps the one sub-range where the sum crosses the target, so 32-bit keys take
# ceil(32 / log2(NT)) passes: a few reads of the row where a sort writes and reads it
# several times and moves the indices too.
FILTER_NT = 16  # candidates a pass


@triton.jit
def _order_key(x):
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _search(x_ptr, n_cols, lo, hi, m, target, floor, MASS: tl.constexpr, NT: tl.constexpr,
            BLOCK: tl.constexpr):
    """The largest key t in [lo, hi) with weight(key >= t) >= target, given that lo
    qualifies and hi does not; only keys >= floor count."""
    j = tl.arange(0, NT)
    while hi - lo > 1:
        step = (hi - lo + NT - 1) // NT
        cand = lo + j.to(tl.int64) * step  # cand[0] = lo
        cand32 = tl.minimum(cand, hi).to(tl.int32)
        # Per-lane partial sums, reduced once a pass: a reduction per block would put a
        # barrier in every iteration (one program a row, so latency, not bandwidth, bounds it).
        acc2 = tl.zeros([NT, BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + cols, mask=cols < n_cols, other=float("-inf"))
            key = _order_key(x)
            if MASS:
                w = tl.where(key >= floor, tl.exp(x - m), 0.0)
            else:
                w = tl.where((key >= floor) & (cols < n_cols), 1.0, 0.0)
            acc2 += tl.where(key[None, :] >= cand32[:, None], w[None, :], 0.0)
        acc = tl.sum(acc2, axis=1)
        ok = (acc >= target) & (cand < hi)
        best = tl.max(tl.where(ok, j, 0), axis=0)
        new_lo = lo + best.to(tl.int64) * step
        hi = tl.minimum(new_lo + step, hi)
        lo = new_lo
    return lo


@triton.jit
def _top_k_top_p_kernel(x_ptr, out_ptr, k_ptr, p_ptr, stride_x, stride_o, n_cols,
                        NT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    # Pass 1: the row's largest and smallest keys (and its largest logit).
    kmax = tl.full([BLOCK], -2147483648, tl.int32)
    kmin = tl.full([BLOCK], 2147483647, tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        key = _order_key(tl.load(x_row + cols, mask=inside, other=0.0))
        kmax = tl.maximum(kmax, tl.where(inside, key, -2147483648))
        kmin = tl.minimum(kmin, tl.where(inside, key, 2147483647))
    top = tl.max(kmax, axis=0).to(tl.int64)
    lo = tl.min(kmin, axis=0).to(tl.int64)
    hi = top + 1
    m = tl.where(top >= 0, top, top ^ 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row masked whole: no NaN from -inf - -inf
    k = tl.load(k_ptr + row)
    if (k > 0) & (k < n_cols):
        lo = _search(x_row, n_cols, lo, hi, m, k.to(tl.float32), lo.to(tl.int32), False, NT, BLOCK)
    floor = lo.to(tl.int32)
    p = tl.load(p_ptr + row)
    if p < 1.0:
        z = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
            z += tl.where(_order_key(x) >= floor, tl.exp(x - m), 0.0)
        lo = _search(x_row, n_cols, lo, hi, m, p * tl.sum(z, axis=0), floor, True, NT, BLOCK)
    thresh = lo.to(tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_row + cols, mask=inside, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, tl.where(_order_key(x) >= thresh, x, float("-inf")),
                 mask=inside)


def top_k_top_p_filter(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """float32 [B, V] logits with every token outside row i's top-k (top_k[i]; 0 or at least
    the vocabulary: none) and then outside the top-p of what is left (top_p[i]; 1: none) set
    to -inf; a new tensor. Top-k keeps the tokens at least as likely as the k-th, top-p
    those at least as likely as the least likely token of the smallest most-likely set
    reaching p of the row's softmax: ties at either threshold are kept. One launch, no
    sort (see FILTER_NT); `top_k_top_p_filter_reference` elsewhere."""
    if not runs_kernel(logits.device):
        return top_k_top_p_filter_reference(logits, top_k, top_p)
    rows, vocab = logits.shape
    x = logits.contiguous()
    out = torch.empty_like(x)
    if rows == 0:
        return out
    cuda = x.device.type == "cuda"
    ks = to_device([int(k) for k in top_k], torch.int32, x.device)
    ps = to_device([float(p) for p in top_p], torch.float32, x.device)
    block = min(triton.next_power_of_2(vocab), 512 if cuda else 1 << 16)
    _top_k_top_p_kernel[(rows,)](x, out, ks, ps, x.stride(0), out.stride(0), vocab,
                                 NT=FILTER_NT, BLOCK=block, num_warps=8)
    return out


def top_k_top_p_filter_reference(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
                                 ) -> torch.Tensor:
    """`top_k_top_p_filter` from one sort of each row (the definition)."""
    vals, idx = logits.sort(dim=1, descending=True)
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    kth = vals.gather(1, torch.tensor([k - 1 for k in ks], device=logits.device).view(-1, 1))
    out = logits.masked_fill(logits < kth, float("-inf"))
    ps = torch.tensor([float(p) for p in top_p], dtype=logits.dtype, device=logits.device)
    probs = out.softmax(dim=1).gather(1, idx)
    remove = ((probs.cumsum(dim=1) - probs) >= ps.unsqueeze(1)) & (ps < 1.0).unsqueeze(1)
    least_kept = vals.masked_fill(remove, float("inf")).min(dim=1, keepdim=True).values
    return out.masked_fill(out < least_kept, float("-inf"))
