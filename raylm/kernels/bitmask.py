"""A structured-output grammar's next-token bitmask applied to a batch's logits, every
grammar row in one launch: row rows[i] of the logits gets -inf at each token that row i
of the packed bitmask does not allow.

The bitmask is xgrammar's packing (`allocate_token_bitmask`, `fill_next_token_bitmask`):
int32 [k, W], token j allowed where bit j % 32 of word j // 32 is 1, i.e.
`(word >> (j % 32)) & 1`; tokens at or past W * 32 (a bitmask narrower than the logits)
are banned, and bits past the logits' vocabulary are ignored. The kernel only stores:
-inf where a bit is 0, nothing where it is 1, so it never reads the logits. The
reference is the same in PyTorch ops (what the CPU runs).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import triton
import triton.language as tl

from raylm.kernels.interpret import runs_kernel
from raylm.kernels.transfer import to_device

_NEG_INF = float("-inf")


@triton.jit
def _token_bitmask_kernel(logits_ptr, stride_l, rows_ptr, bitmask_ptr, stride_b, vocab, n_words,
                          WORDS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    # This program's WORDS words, and the 32 tokens of each: a [WORDS, 32] block.
    w = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    words = tl.load(bitmask_ptr + i * stride_b + w, mask=w < n_words, other=0)  # 0: banned
    shift = tl.arange(0, 32)
    # & 1 after the shift: the sign bit's arithmetic shift only fills bits above bit 0.
    bits = (words[:, None] >> shift[None, :]) & 1
    cols = w[:, None] * 32 + shift[None, :]
    neg_inf = tl.full((WORDS, 32), float("-inf"), tl.float32)  # the store casts it
    tl.store(logits_ptr + row * stride_l + cols, neg_inf, mask=(cols < vocab) & (bits == 0))


def _rows_tensor(rows: Union[torch.Tensor, Sequence[int]], device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device=device, dtype=torch.int64)
    return to_device(list(rows), torch.int64, device)  # pinned: never waits for the GPU


def apply_token_bitmask(logits: torch.Tensor, rows: Union[torch.Tensor, Sequence[int]],
                        bitmask: torch.Tensor) -> None:
    """In place: -inf at every token of row `rows[i]` of `logits` (float [B, V], last dim
    contiguous, any row stride) that row i of `bitmask` (int32 [k, W] on the logits'
    device, xgrammar's packing) does not allow; tokens past W * 32 are banned. `rows`: k
    distinct row indices, a list or an int64 tensor. One launch on CUDA."""
    if not runs_kernel(logits.device):
        apply_token_bitmask_ref(logits, rows, bitmask)
        return
    k = len(rows)
    if bitmask.dim() != 2 or bitmask.shape[0] != k:
        raise ValueError(f"bitmask has shape {tuple(bitmask.shape)}; want [{k}, words] for {k} rows")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask is {bitmask.dtype}; want torch.int32")
    if logits.stride(1) != 1:
        raise ValueError("logits' last dimension must be contiguous")
    vocab = logits.shape[1]
    if k == 0 or vocab == 0:
        return
    if bitmask.stride(1) != 1:
        bitmask = bitmask.contiguous()
    idx = _rows_tensor(rows, logits.device)
    cuda = logits.device.type == "cuda"
    # 128 words = 4096 tokens a program on CUDA. The interpreter pays per program, not
    # per element: whole rows up to 64k tokens there.
    words = min(triton.next_power_of_2(triton.cdiv(vocab, 32)), 128 if cuda else 2048)
    _token_bitmask_kernel[(k, triton.cdiv(vocab, words * 32))](
        logits, logits.stride(0), idx, bitmask, bitmask.stride(0), vocab, bitmask.shape[1],
        WORDS=words, num_warps=4)


def apply_token_bitmask_ref(logits: torch.Tensor, rows: Union[torch.Tensor, Sequence[int]],
                            bitmask: torch.Tensor) -> None:
    """`apply_token_bitmask` in PyTorch ops: the same tokens set to -inf."""
    if len(rows) == 0:
        return
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    idx = _rows_tensor(rows, logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed[:, :vocab], _NEG_INF)
