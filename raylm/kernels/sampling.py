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
