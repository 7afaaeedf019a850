"""Tune the fused W4A16 kernel's launch configuration (quant_gemm.W4Config) at Llama-3.1-8B's
linear shapes, against bf16 cuBLAS in the same run.

For each layout (GPTQ without g_idx, AWQ), group 128:
1. at M=1, every (block_n, block_k, expand) with split_k as quant_gemm.pick_config would
   choose it, 4 warps, 3 stages;
2. around the best two of those per layout (summed over the four shapes): split_k at 1/2,
   1 and 2x that choice, 4 or 8 warps, 2 or 4 stages;
3. large: at each --large-m (prefill and large decode batches), every (block_m, block_n,
   block_k, num_warps) with unpacked words and 3 stages, against dequantize-then-cuBLAS;
4. batch: with the best decode tiles (from stage 2, or the production DECODE_CONFIG when
   stage 2 is not run), at each --m: the fused kernel (pick_config's block_m and split)
   against dequantize-then-cuBLAS (quant_gemm's path from DEQUANT_MIN_M rows);
5. w4r: the repacked layout's kernel (quant_gemm.w4r_gemm) at each --m and --large-m:
   every (block_n, block_k, num_warps) with block_m the power of two >= M (16 to 128; from
   M=256 also 256) and 3 stages, then 4 stages and K split at 0.5x/2x/4x around the best
   three, against the production choice (pick_w4r_config) and its dequantize-then-cuBLAS
   path.
--stages picks which run (default the first four).

Timing as in quant_gemm.py: a CUDA graph of calls cycling through enough weight copies
that they come from HBM, replayed between CUDA events, median. The summary gives, per
layout, the best configuration and one decoder layer's four GEMMs against bf16.

    python benchmarks/w4a16_tune.py            # H100: about 2.5 minutes
    python benchmarks/w4a16_tune.py --stages large --large-m 256,512
    python benchmarks/w4a16_tune.py --smoke    # CPU, interpreter, tiny shapes: checks it runs

Writes benchmarks/results/w4a16_tune.json (w4a16_tune-w4r.json for --stages w4r; or under $OUT).
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


def _setup(shapes, dtype, device, smoke, formats):
    """Per shape: bf16 weights and the formats' packed weights, each in enough copies."""
    gen = torch.Generator(device=device).manual_seed(0)
    group = 32 if smoke else qg.GROUP_SIZE
    weights = {}
    for name, k, n in shapes:
        for fmt in ["bf16", *formats]:
            one = qg.make_weights(fmt, k, n, dtype, gen, device, group)
            copies = 1 if smoke else max(1, min(64, -(-qg.L2_FLUSH_BYTES // qg.weight_bytes(one))))
            weights[name, fmt] = [one] + [qg.make_weights(fmt, k, n, dtype, gen, device, group)
                                          for _ in range(copies - 1)]
    return weights, group


def _time(fn_of_w, ws, args, cuda) -> float:
    return qg.time_over_weights(fn_of_w, ws, args.reps, args.min_calls, cuda)


def _w4(layout, x, group, cfg=None, dequant=False):
    from raylm.kernels import quant as quant_gemm

    zero_offset = 1 if layout == "gptq" else 0

    def make(w):
        return lambda: quant_gemm.w4a16_gemm(
            x, w["qweight"], w["scales"], w["qzeros"], None, group, layout, zero_offset=zero_offset,
            config=cfg, dequant_min_m=1 if dequant else 1 << 30)
    return make


def run(args) -> dict:
    from raylm.kernels import quant as quant_gemm

    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = qg.SMOKE_SHAPES if args.smoke else qg.LLAMA_8B_SHAPES
    stages = set(args.stages.split(","))
    formats = [f for layout, f in LAYOUTS.items() if stages - {"w4r"}] + (["w4a16-w4r"] if "w4r" in stages else [])
    weights, group = _setup(shapes, dtype, device, args.smoke, formats)
    gen = torch.Generator(device=device).manual_seed(1)
    xs = {(k, m): torch.randn(m, k, generator=gen, device=device, dtype=dtype)
          for _, k, _ in shapes for m in sorted({1, *args.m, *args.large_m})}  # every M a stage uses
    result = common.base_result("w4a16_tune", "llama-3.1-8b shapes" if cuda else "smoke shapes")
    result.update({"group_size": group, "shapes": [{"name": s, "k": k, "n": n} for s, k, n in shapes]})
    rows = []

    def record(stage, layout, shape, k, n, m, cfg, seconds, path="fused"):
        rows.append({"stage": stage, "layout": layout, "shape": shape, "k": k, "n": n, "m": m,
                     "path": path, "config": cfg._asdict() if cfg else None, "time_us": seconds * 1e6})

    bf16 = {}
    for (name, k, n), m in itertools.product(shapes, sorted({1, *args.m, *args.large_m})):
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

    stage_name = ["bf16"]
    blocks_n = [32, 64, 128, 256] if cuda else [32]
    blocks_k = [64, 128, 256] if cuda else [32]
    summary = {"bf16_layer_us": {m: sum(bf16[s, m] for s, _, _ in shapes) * 1e6 for m in sorted({1, *args.m, *args.large_m})}}
    for layout in (LAYOUTS if stages - {"w4r"} else []):
        best = quant_gemm.DECODE_CONFIG[layout]
        best_t, best_split = float("inf"), 1.0
        summary[layout] = {}
        if "grid" in stages:
            stage_name[0] = "grid"
            scored = []
            for bn, bk, expand in itertools.product(blocks_n, blocks_k, [False, True]):
                base = quant_gemm.W4Config(16, bn, bk, 1, expand, 4 if cuda else 1, 3 if cuda else 1)
                t = layer_time(layout, lambda k, n, base=base: quant_gemm.with_split(base, 1, k, n), 1)
                scored.append((t, base))
                print(f"{layout} M=1 bn={bn} bk={bk} expand={expand}: layer {t * 1e6:.1f} us", flush=True)
            scored.sort(key=lambda p: p[0])
            best_t, best = scored[0]
            if "refine" in stages:
                stage_name[0] = "refine"
                for _, base in scored[:2]:
                    for scale, warps, n_stages in itertools.product(
                            [0.5, 1.0, 2.0], [4, 8] if cuda else [1], [2, 4] if cuda else [1]):
                        cand = base._replace(num_warps=warps, num_stages=n_stages)
                        target = int(quant_gemm.TARGET_PROGRAMS * scale)
                        t = layer_time(layout, lambda k, n, c=cand, t=target: quant_gemm.with_split(c, 1, k, n, t), 1)
                        print(f"{layout} M=1 {cand} split x{scale}: layer {t * 1e6:.1f} us", flush=True)
                        if t < best_t:
                            best_t, best, best_split = t, cand, scale
            summary[layout].update({"best_m1_config": best._asdict(), "split_scale": best_split,
                                    "m1_layer_us": best_t * 1e6,
                                    "m1_speedup_vs_bf16": summary["bf16_layer_us"][1] / (best_t * 1e6)})
            print(f"{layout}: best M=1 {best} split x{best_split}: {best_t * 1e6:.1f} us/layer, "
                  f"{summary[layout]['m1_speedup_vs_bf16']:.2f}x bf16", flush=True)
        if "large" in stages:
            stage_name[0] = "large"
            large = {}
            for m in args.large_m:
                td = layer_time(layout, None, m, dequant=True)
                scored = []
                for bm, bn, bk, warps in itertools.product([64, 128] if cuda else [16], [64, 128, 256] if cuda else [32],
                                                           [32, 64] if cuda else [32], [4, 8] if cuda else [1]):
                    cand = quant_gemm.W4Config(bm, bn, bk, 1, True, warps, 3 if cuda else 1)
                    t = layer_time(layout, lambda k, n, c=cand, m=m: quant_gemm.with_split(c, m, k, n), m)
                    scored.append((t, cand))
                    print(f"{layout} M={m} {cand}: layer {t * 1e6:.1f} us (dequant+cuBLAS {td * 1e6:.1f})", flush=True)
                scored.sort(key=lambda p: p[0])
                large[m] = {"best_config": scored[0][1]._asdict(), "fused_us": scored[0][0] * 1e6,
                            "dequant_us": td * 1e6}
                print(f"{layout} M={m}: best fused {scored[0][1]} {scored[0][0] * 1e6:.1f} us, dequant+cuBLAS "
                      f"{td * 1e6:.1f} us, bf16 {summary['bf16_layer_us'][m]:.1f} us", flush=True)
            summary[layout]["large"] = large
        if "batch" in stages:
            stage_name[0] = "batch"
            per_m = {}
            for m in args.m:

                def fused(k, n, m=m):
                    cfg = best._replace(block_m=quant_gemm.pick_config(m, k, n, layout, group).block_m)
                    return quant_gemm.with_split(cfg, m, k, n, int(quant_gemm.TARGET_PROGRAMS * best_split))
                tf = layer_time(layout, fused, m)
                td = layer_time(layout, None, m, dequant=True)
                per_m[m] = {"fused_us": tf * 1e6, "dequant_us": td * 1e6}
                print(f"{layout} M={m}: fused {tf * 1e6:.1f} us, dequant+cuBLAS {td * 1e6:.1f} us, "
                      f"bf16 {summary['bf16_layer_us'].get(m, float('nan')):.1f} us", flush=True)
            summary[layout]["batch"] = per_m
    if "w4r" in stages:
        stage_name[0] = "w4r"
        summary["w4r"] = _tune_w4r(args, shapes, weights, xs, group, cuda, summary["bf16_layer_us"], record)
    result["rows"] = rows
    result["summary"] = summary
    return result


def _tune_w4r(args, shapes, weights, xs, group, cuda, bf16_us, record) -> dict:
    from raylm.kernels import quant as quant_gemm

    def layer_time(m, cfg_for_shape, dequant=False):
        total = 0.0
        for name, k, n in shapes:
            cfg = cfg_for_shape(k, n) if cfg_for_shape else None
            x = xs[k, m]

            def make(w, x=x, cfg=cfg):
                return lambda: quant_gemm.w4r_gemm(x, w["qweight"], w["scales"], w["zb"], group, config=cfg,
                                                   dequant_min_m=1 if dequant else None)
            t = _time(make, weights[name, "w4a16-w4r"], args, cuda)
            record("w4r", "w4r", name, k, n, m, cfg, t, "dequant+cublas" if dequant else ("fused" if cfg else "chosen"))
            total += t
        return total

    out = {}
    for m in sorted({*args.m, *args.large_m}):
        bms = [min(128, max(16, 1 << (m - 1).bit_length()))] + ([256] if m >= 256 else []) if cuda else [16]
        scored = []
        for bm, bn, bk, warps in itertools.product(bms, [64, 128, 256] if cuda else [32], [64, 128] if cuda else [32],
                                                   [4, 8] if cuda else [1]):
            if cuda and bm * bn > 128 * 128 and warps == 4:
                continue  # the float32 accumulator alone would take 128+ registers a thread
            cand = quant_gemm.W4Config(bm, bn, bk, 1, False, warps, 3 if cuda else 1)
            t = layer_time(m, lambda k, n, c=cand: quant_gemm.with_split(c, m, k, n))
            scored.append((t, cand, 1.0))
            print(f"w4r M={m} {cand}: layer {t * 1e6:.1f} us", flush=True)
        scored.sort(key=lambda p: p[0])
        for _, base, _ in scored[:3] if cuda else []:
            for n_stages, scale in [(4, 1.0), (3, 0.5), (3, 2.0), (3, 4.0), (4, 2.0), (4, 4.0)]:
                cand = base._replace(num_stages=n_stages)
                target = int(quant_gemm.TARGET_PROGRAMS * scale)
                t = layer_time(m, lambda k, n, c=cand, t=target: quant_gemm.with_split(c, m, k, n, t))
                scored.append((t, cand, scale))
                print(f"w4r M={m} {cand} split x{scale}: layer {t * 1e6:.1f} us", flush=True)
        scored.sort(key=lambda p: p[0])
        chosen = layer_time(m, None)
        dequant = layer_time(m, None, dequant=True)
        best_t, best, best_scale = scored[0]
        out[m] = {"best_config": best._asdict(), "split_scale": best_scale, "best_us": best_t * 1e6,
                  "chosen_us": chosen * 1e6, "dequant_us": dequant * 1e6, "bf16_us": bf16_us[m]}
        print(f"w4r M={m}: best {best} split x{best_scale} {best_t * 1e6:.1f} us, chosen {chosen * 1e6:.1f} us, "
              f"dequant+cuBLAS {dequant * 1e6:.1f} us, bf16 {bf16_us[m]:.1f} us", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64],
                   help="batch sizes for the batch stage")
    p.add_argument("--large-m", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512],
                   help="batch sizes for the large stage")
    p.add_argument("--stages", default="grid,refine,large,batch", help="any of grid,refine,large,batch,w4r")
    qg.add_timing_args(p)
    args = qg.parse_timing_args(p)
    if args.smoke:
        args.m, args.large_m = [17], [40]
    result = run(args)
    name = "w4a16_tune-w4r" if args.stages == "w4r" else "w4a16_tune"
    common.save_result(result, name + "-smoke" if args.smoke else name)


if __name__ == "__main__":
    main()
