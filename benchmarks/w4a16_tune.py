"""Tune the fused W4A16 kernel's launch configuration (quant_gemm.W4Config) at Llama-3.1-8B's
linear shapes, against bf16 cuBLAS in the same run.

For each layout (GPTQ without g_idx, AWQ), group 128:
1. at M=1, every (block_n, block_k, expand) with split_k as quant_gemm.pick_config would
   choose it, 4 warps, 3 stages;
2. around the best two of those per layout (summed over the four shapes): split_k at 1/2,
   1 and 2x that choice, 4 or 8 warps, 2 or 4 stages;
3. with the best decode tiles, M = 16, 32, 64: the fused kernel (block_m = M) against
   dequantize-then-cuBLAS (quant_gemm's path from DEQUANT_MIN_M rows).

Timing as in quant_gemm.py: a CUDA graph of calls cycling through enough weight copies
that they come from HBM, replayed between CUDA events, median. The summary gives, per
layout, the best configuration and one decoder layer's four GEMMs against bf16.

    python benchmarks/w4a16_tune.py            # H100
    python benchmarks/w4a16_tune.py --smoke    # CPU, interpreter, tiny shapes: checks it runs

Writes benchmarks/results/w4a16_tune.json (or under $OUT).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common, quant_gemm as qg  # noqa: E402

LAYOUTS = {"gptq": "w4a16-gptq-no-gidx", "awq": "w4a16-awq"}


def _setup(shapes, dtype, device, smoke):
    """Per shape: bf16 weights and both layouts' packed weights, each in enough copies."""
    gen = torch.Generator(device=device).manual_seed(0)
    group = 32 if smoke else qg.GROUP_SIZE
    weights = {}
    for name, k, n in shapes:
        for fmt in ["bf16", *LAYOUTS.values()]:
            one = qg.make_weights(fmt, k, n, dtype, gen, device, group)
            copies = 1 if smoke else max(1, min(64, -(-qg.L2_FLUSH_BYTES // qg.weight_bytes(one))))
            weights[name, fmt] = [one] + [qg.make_weights(fmt, k, n, dtype, gen, device, group)
                                          for _ in range(copies - 1)]
    return weights, group


def _time(fn_of_w, ws, args, cuda) -> float:
    calls = [fn_of_w(w) for w in ws]
    calls = calls * max(1, -(-args.min_calls // len(calls)))
    try:
        seconds, _ = qg.time_calls(calls, args.reps, cuda)
    except Exception as e:  # noqa: BLE001 - a configuration that does not compile: skip it, say so
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return float("inf")
    return seconds


def _w4(layout, x, group, cfg=None, dequant=False):
    from raylm.kernels import quant_gemm

    zero_offset = 1 if layout == "gptq" else 0

    def make(w):
        return lambda: quant_gemm.w4a16_gemm(
            x, w["qweight"], w["scales"], w["qzeros"], None, group, layout, zero_offset=zero_offset,
            config=cfg, dequant_min_m=1 if dequant else 1 << 30)
    return make


def run(args) -> dict:
    from raylm.kernels import quant_gemm

    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = qg.SMOKE_SHAPES if args.smoke else qg.LLAMA_8B_SHAPES
    weights, group = _setup(shapes, dtype, device, args.smoke)
    gen = torch.Generator(device=device).manual_seed(1)
    xs = {(k, m): torch.randn(m, k, generator=gen, device=device, dtype=dtype)
          for _, k, _ in shapes for m in [1, *args.m]}
    result = common.base_result("w4a16_tune", "llama-3.1-8b shapes" if cuda else "smoke shapes")
    result.update({"group_size": group, "shapes": [{"name": s, "k": k, "n": n} for s, k, n in shapes]})
    rows = []

    def record(stage, layout, shape, k, n, m, cfg, seconds, path="fused"):
        rows.append({"stage": stage, "layout": layout, "shape": shape, "k": k, "n": n, "m": m,
                     "path": path, "config": cfg._asdict() if cfg else None, "time_us": seconds * 1e6})

    bf16 = {}
    for (name, k, n), m in itertools.product(shapes, [1, *args.m]):
        x = xs[k, m]
        bf16[name, m] = _time(lambda w: (lambda: torch.matmul(x, w["w"].t())), weights[name, "bf16"], args, cuda)
        record("bf16", "bf16", name, k, n, m, None, bf16[name, m], "cublas")

    def layer_time(layout, cfg_for_shape, m, dequant=False):
        total = 0.0
        for name, k, n in shapes:
            cfg = None if dequant else cfg_for_shape(k, n)
            t = _time(_w4(layout, xs[k, m], group, cfg, dequant), weights[name, LAYOUTS[layout]], args, cuda)
            record(stage_name[0], layout, name, k, n, m, cfg, t, "dequant+cublas" if dequant else "fused")
            total += t
        return total

    stage_name = ["grid"]
    blocks_n = [32, 64, 128, 256] if cuda else [32]
    blocks_k = [64, 128, 256] if cuda else [32]
    summary = {"bf16_layer_us": {m: sum(bf16[s, m] for s, _, _ in shapes) * 1e6 for m in [1, *args.m]}}
    for layout in LAYOUTS:
        scored = []
        for bn, bk, expand in itertools.product(blocks_n, blocks_k, [False, True]):
            base = quant_gemm.W4Config(16, bn, bk, 1, expand, 4 if cuda else 1, 3 if cuda else 1)

            def auto(k, n, base=base):
                tiles = -(-n // base.block_n)
                return base._replace(split_k=max(1, min(quant_gemm.TARGET_PROGRAMS // tiles, -(-k // base.block_k))))
            t = layer_time(layout, auto, 1)
            scored.append((t, base))
            print(f"{layout} M=1 bn={bn} bk={bk} expand={expand}: layer {t * 1e6:.1f} us", flush=True)
        scored.sort(key=lambda p: p[0])
        stage_name[0] = "refine"
        best_t, best = scored[0]
        best_split = 1.0
        for _, base in scored[:2]:
            for scale, warps, stages in itertools.product([0.5, 1.0, 2.0], [4, 8] if cuda else [1],
                                                          [2, 4] if cuda else [1]):
                cand = base._replace(num_warps=warps, num_stages=stages)

                def scaled(k, n, cand=cand, scale=scale):
                    tiles = -(-n // cand.block_n)
                    split = int(max(1, quant_gemm.TARGET_PROGRAMS // tiles) * scale)
                    return cand._replace(split_k=max(1, min(split, -(-k // cand.block_k))))
                t = layer_time(layout, scaled, 1)
                print(f"{layout} M=1 {cand} split x{scale}: layer {t * 1e6:.1f} us", flush=True)
                if t < best_t:
                    best_t, best, best_split = t, cand, scale
        stage_name[0] = "batch"
        per_m = {}
        for m in args.m:
            bm = max(16, 1 << (m - 1).bit_length())
            cfg_m = best._replace(block_m=bm)

            def fused(k, n, cfg_m=cfg_m, m=m):
                tiles = -(-n // cfg_m.block_n) * -(-m // cfg_m.block_m)
                split = int(max(1, quant_gemm.TARGET_PROGRAMS // tiles) * best_split)
                return cfg_m._replace(split_k=max(1, min(split, -(-k // cfg_m.block_k))))
            tf = layer_time(layout, fused, m)
            td = layer_time(layout, None, m, dequant=True)
            per_m[m] = {"fused_us": tf * 1e6, "dequant_us": td * 1e6}
            print(f"{layout} M={m}: fused {tf * 1e6:.1f} us, dequant+cuBLAS {td * 1e6:.1f} us, "
                  f"bf16 {summary['bf16_layer_us'][m]:.1f} us", flush=True)
        summary[layout] = {"best_m1_config": best._asdict(), "split_scale": best_split,
                           "m1_layer_us": best_t * 1e6,
                           "m1_speedup_vs_bf16": summary["bf16_layer_us"][1] / (best_t * 1e6),
                           "batch": per_m}
        print(f"{layout}: best M=1 {best} split x{best_split}: {best_t * 1e6:.1f} us/layer, "
              f"{summary[layout]['m1_speedup_vs_bf16']:.2f}x bf16", flush=True)
    result["rows"] = rows
    result["summary"] = summary
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64],
                   help="batch sizes for stage 3")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--min-calls", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = p.parse_args()
    if args.smoke:
        from raylm.kernels.interpret import use_interpreter

        use_interpreter()
        args.reps, args.min_calls, args.m = 1, 1, [17]
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU; --smoke runs tiny shapes on CPU")
    result = run(args)
    common.save_result(result, "w4a16_tune-smoke" if args.smoke else "w4a16_tune")


if __name__ == "__main__":
    main()
