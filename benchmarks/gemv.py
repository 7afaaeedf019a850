"""Batch-1 weight GEMVs: cuBLAS (F.linear) against raylm's Triton GEMV (raylm.kernels.gemv)
at a model's linear shapes, each timed inside a CUDA graph of 20 calls, with the bytes
streamed per second (the weight's bytes over the time).

    python benchmarks/gemv.py --model llama-3.1-8b
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402

# (rows per program, K chunk, warps, stages)
CONFIGS = [(8, 512, 4, 3), (4, 512, 4, 3), (16, 256, 4, 3), (8, 256, 4, 4), (8, 1024, 8, 2), (4, 1024, 4, 2),
           (2, 512, 4, 3), (2, 1024, 4, 3), (4, 512, 4, 4), (4, 256, 2, 4), (2, 2048, 8, 2), (1, 2048, 4, 3),
           (4, 1024, 8, 3), (2, 1024, 2, 4)]


def shapes(cfg) -> dict:
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"qkv_proj": (q + 2 * kv, h), "o_proj": (h, q), "gate_up_proj": (2 * i, h), "down_proj": (h, i),
            "lm_head": (cfg.vocab_size, h)}


def time_us(fn, reps: int = 20, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(iters):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, 1e3 * start.elapsed_time(end) / reps)
    return best


# The gate/up GEMV with SiLU-and-mul as its epilogue: (gate rows per program, K chunk, warps, stages).
SILU_CONFIGS = [(1, 2048, 8, 2), (1, 1024, 4, 3), (1, 1024, 8, 2), (1, 4096, 8, 2), (2, 2048, 8, 2),
                (2, 1024, 8, 2), (1, 2048, 4, 2), (1, 512, 4, 4)]


def time_gate_up_silu(x, ws, pick, n, k) -> list[dict]:
    """silu(gate) * up of the merged gate/up weight: cuBLAS then the SiLU kernel, the
    engine's GEMV then the SiLU kernel, and the fused GEMV (gemv_silu_mul) per config."""
    from raylm.kernels.activation import silu_and_mul
    from raylm.kernels.gemv import gemv, gemv_silu_mul
    from raylm.workers.layers.linear import GEMV_TILES

    ref = silu_and_mul(F.linear(x, ws[0])).float()
    cands = {"cublas + silu": lambda: silu_and_mul(F.linear(x, pick())),
             "triton + silu": lambda: silu_and_mul(gemv(x, pick(), **GEMV_TILES))}
    for bn, bk, warps, stages in SILU_CONFIGS:
        err = (gemv_silu_mul(x, ws[0], block_n=bn, block_k=bk, num_warps=warps, num_stages=stages).float()
               - ref).abs().max()
        assert err <= 0.05 * ref.abs().max() + 1e-2, ("gate_up_silu", bn, bk, float(err))
        cands[f"fused {bn}/{bk}/{warps}/{stages}"] = (
            lambda bn=bn, bk=bk, w=warps, s=stages: gemv_silu_mul(x, pick(), block_n=bn, block_k=bk,
                                                                  num_warps=w, num_stages=s))
    rows = []
    for backend, fn in cands.items():
        us = time_us(fn)
        rows.append({"op": "gate_up_silu", "n": n, "k": k, "backend": backend, "us": us,
                     "tb_per_s": n * k * 2 / us / 1e6})
        print(f"{'gate_up_silu':14s} {n:6d} x {k:6d} {backend:22s} {us:8.1f} us {rows[-1]['tb_per_s']:5.2f} TB/s",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    args = p.parse_args()
    from transformers import AutoConfig

    from raylm.kernels.gemv import gemv

    cfg = AutoConfig.from_pretrained(common.model_dir(args.model))
    dev = torch.device("cuda")
    rows = []
    for name, (n, k) in shapes(cfg).items():
        # A weight per call site, as many as fit in 2 GB: the graph's calls read different
        # weights, so L2 holds none between them (50 MB on an H100).
        copies = max(1, min(20, (2 << 30) // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        idx = [0]

        def pick():
            idx[0] = (idx[0] + 1) % copies
            return ws[idx[0]]

        ref = F.linear(x, ws[0]).float()
        cands = {"cublas": lambda: F.linear(x, pick())}
        for bn, bk, warps, stages in CONFIGS:
            err = (gemv(x, ws[0], block_n=bn, block_k=bk, num_warps=warps, num_stages=stages).float() - ref).abs().max()
            assert err <= 0.05 * ref.abs().max() + 1e-2, (name, bn, bk, float(err))
            cands[f"triton {bn}/{bk}/{warps}/{stages}"] = (
                lambda bn=bn, bk=bk, w=warps, s=stages: gemv(x, pick(), block_n=bn, block_k=bk, num_warps=w, num_stages=s))
        for backend, fn in cands.items():
            us = time_us(fn)
            rows.append({"op": name, "n": n, "k": k, "backend": backend, "us": us, "tb_per_s": n * k * 2 / us / 1e6})
            print(f"{name:14s} {n:6d} x {k:6d} {backend:22s} {us:8.1f} us {rows[-1]['tb_per_s']:5.2f} TB/s", flush=True)
        if name == "gate_up_proj":
            rows += time_gate_up_silu(x, ws, pick, n, k)
        del ws
    res = common.base_result("gemv", args.model)
    res.update({"command": "python " + " ".join(sys.argv), "rows": rows,
                "copy_tb_per_s": common.measure_bandwidth() / 1e12})
    common.save_result(res, f"gemv-{args.model}")


if __name__ == "__main__":
    main()
