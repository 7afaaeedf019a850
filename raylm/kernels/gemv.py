"""One-row matrix-vector product for bf16/fp16 weights: y = x @ W.T with x [1, K] and W
[N, K] (nn.Linear's layout), on CUDA cores, each program streaming BLOCK_N whole rows of
W. Decode at batch 1 is weight streaming; cuBLAS's M=1 tiles for some shapes leave the
SMs short of bytes in flight (Llama-3.1-8B's o_proj, 4096 x 4096: 64 tiles of 64 rows
at 1.66 TB/s on an H100, benchmarks/gpu_step_breakdown.py --concurrency 1)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def _one_row(x: torch.Tensor, weight: torch.Tensor, what: str) -> torch.Tensor:
    """x as the contiguous [K] row a GEMV kernel reads; a ValueError naming `what` when x is
    not one row of the weight's K or the weight's rows are strided along K."""
    k = weight.shape[1]
    x1 = x.reshape(-1)
    if x1.numel() != k:
        raise ValueError(f"{what} takes one row: x has {x.numel()} elements, the weight's rows {k}")
    if weight.stride(1) != 1:
        raise ValueError(f"{what} needs the weight's rows contiguous (stride 1 along K)")
    return x1 if x1.stride(0) == 1 else x1.contiguous()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         block_n: int = 8, block_k: int = 512, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [1, K] (or [K]) @ weight[N, K].T (+ bias) -> [1, N] in x's dtype, float32 sums."""
    n, k = weight.shape
    x1 = _one_row(x, weight, "gemv")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch, float32 sums."""
    y = x.reshape(1, -1).float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _gemv_silu_mul_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_w,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows r of the gate half and r + N of the up half in one program, so silu(g) * u is
    its epilogue."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    g_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    u_rows = w_ptr + (rows.to(tl.int64) + N)[:, None] * stride_w
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        wg = tl.load(g_rows + cols[None, :], mask=mask, other=0.0)
        wu = tl.load(u_rows + cols[None, :], mask=mask, other=0.0)
        acc_g += wg.to(tl.float32) * x
        acc_u += wu.to(tl.float32) * x
    # Each product rounded to the output dtype first, as the unfused path stores it.
    g = tl.sum(acc_g, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, block_n: int = 1, block_k: int = 2048,
                  num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for one row x [1, K] and the MLP's merged weight
    [2 * I, K] (gate rows, then up rows) -> [1, I]: the gate/up GEMV with SiLU-and-mul as
    its epilogue, one launch and no [1, 2 * I] intermediate."""
    n2, k = weight.shape
    if n2 % 2:
        raise ValueError(f"gemv_silu_mul needs [gate; up] rows: the weight has an odd {n2} rows")
    n = n2 // 2
    x1 = _one_row(x, weight, "gemv_silu_mul")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_silu_mul_kernel[(triton.cdiv(n, block_n),)](
        x1, weight, out, n, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


def gemv_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the GEMV's [1, 2 * I] output in x's dtype, then SiLU-and-mul in float32."""
    gate, up = gemv_ref(x, weight).float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
