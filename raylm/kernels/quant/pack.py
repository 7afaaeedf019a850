"""Weight packing of 4/8-bit checkpoints and plain PyTorch dequantization (the CPU path
and the references of the w4a16 kernel).

Packing, as the checkpoints store it (int32 words, value j of a word at bits
j*bits .. j*bits+bits-1):
- GPTQ (AutoGPTQ / GPTQModel): qweight [K // pack, N] packs 32 // bits consecutive input
  rows: row pack*i + j sits in word i at slot j. qzeros [groups, N // pack] packs output
  columns the same way along N. Input row k belongs to group g_idx[k] (act-order), or
  k // group_size without g_idx; group_size -1 means one group. GPTQ v1 checkpoints store
  zero - 1: pass zero_offset=1 (added after unpacking and masking, as vLLM does).
- AWQ (AutoAWQ GEMM, awq/utils/packing_utils.py; vLLM awq_triton.py): 4-bit only,
  qweight [K, N // 8] and qzeros [groups, N // 8] pack 8 output columns per word in
  AWQ_ORDER: slot i holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i], so column j
  sits in slot AWQ_REVERSE_ORDER[j] = [0, 4, 1, 5, 2, 6, 3, 7][j]. Rows are not packed.
Dequantization: w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]; without qzeros the zero
is 2 ** (bits - 1) (symmetric)."""
from __future__ import annotations

from typing import Optional

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
LAYOUTS = ("gptq", "awq")


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] int32 -> [R * 32 // bits, C]: slot j of word i is row (32 // bits) * i + j."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `unpack_rows`: [R, C] ints in [0, 2**bits) -> [R * bits // 32, C] int32."""
    pack = 32 // bits
    v = values.to(torch.int64).reshape(-1, pack, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device).view(1, -1, 1)
    words = (v << shifts).sum(dim=1)  # < 2**32: no two slots overlap
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack_cols(packed: torch.Tensor, bits: int, order: Optional[list] = None) -> torch.Tensor:
    """[R, C] int32 -> [R, C * 32 // bits]; column j of a word sits in slot order[j]
    (slot j without an order)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if order is not None:
        shifts = shifts[order]
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


def unpack_gptq(qweight: torch.Tensor, qzeros: Optional[torch.Tensor], bits: int = 4):
    """GPTQ-packed -> (q int32 [K, N], z int32 [groups, N] or None), stored values
    (no zero_offset applied)."""
    _check_bits(bits, "gptq")
    z = None if qzeros is None else _unpack_cols(qzeros, bits)
    return unpack_rows(qweight, bits), z


def unpack_awq(qweight: torch.Tensor, qzeros: Optional[torch.Tensor], bits: int = 4):
    """AWQ-packed -> (q int32 [K, N], z int32 [groups, N] or None) in natural column order."""
    _check_bits(bits, "awq")
    z = None if qzeros is None else _unpack_cols(qzeros, bits, AWQ_REVERSE_ORDER)
    return _unpack_cols(qweight, bits, AWQ_REVERSE_ORDER), z


def _dequantize(q, z, scales, g_idx, group_size, bits, zero_offset):
    k = q.shape[0]
    if g_idx is None:
        group_size = k if group_size == -1 else group_size
        g_idx = torch.arange(k, device=q.device) // group_size
    g_idx = g_idx.long()
    zeros = 1 << (bits - 1) if z is None else (z + zero_offset)[g_idx]
    return (q - zeros).float() * scales.float()[g_idx]


def dequantize_gptq(qweight, scales, qzeros, g_idx=None, group_size=128, bits=4, zero_offset=0):
    """GPTQ-packed weight -> float32 [K, N] (the transpose of nn.Linear's weight)."""
    q, z = unpack_gptq(qweight, qzeros, bits)
    return _dequantize(q, z, scales, g_idx, group_size, bits, zero_offset)


def dequantize_awq(qweight, scales, qzeros, group_size=128, bits=4, zero_offset=0):
    """AWQ-packed weight -> float32 [K, N]."""
    q, z = unpack_awq(qweight, qzeros, bits)
    return _dequantize(q, z, scales, None, group_size, bits, zero_offset)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {LAYOUTS}")


def _check_bits(bits: int, layout: str) -> None:
    allowed = (4, 8) if layout == "gptq" else (4,)
    if bits not in allowed:
        raise ValueError(f"bits is {bits}; {layout} supports {allowed}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected}")

