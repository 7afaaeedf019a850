"""Tune the W8A8 int8 Triton kernel's launch configuration (quant_gemm.I8Config) at
Llama-3.1-8B's linear shapes, against bf16 cuBLAS and torch._int_mm in the same run;
with --format fp8-block, the same kernel's block-scaled fp8 mode (HF fp8 checkpoints:
128x128 weight blocks, group-major scales) against bf16 and per-channel fp8
(quant_gemm.fp8_gemm) instead, over tiles whose block_k divides 128.

At each --m, for every tile in the grid (block_m the power of two >= M up to 64, else 64
or 128; block_n 64/128/256; block_k 64/128/256; 4 or 8 warps; 3 or 4 stages; K split as
quant_gemm.int8_with_split splits it), one decoder layer's four GEMMs are timed;
the best tile per M (summed over the four shapes, since production picks by M only) is
reported beside bf16 cuBLAS, torch._int_mm followed by the scales in PyTorch (the
kernel this one replaced) and the current INT8_CONFIGS choice. The activation
quantization is timed separately (quant_act.per_token_quant_int8, four calls per layer:
qkv, o, gate_up and down each quantize their input).

Timing as in quant_gemm.py: a CUDA graph of calls cycling through enough weight copies
that they come from HBM, replayed between CUDA events, median.

    python benchmarks/int8_tune.py                    # H100
    python benchmarks/int8_tune.py --m 1,64,512       # fewer batch sizes
    python benchmarks/int8_tune.py --format fp8-block --m 64,512,4096
    python benchmarks/int8_tune.py --smoke            # CPU, interpreter, tiny shapes

Writes benchmarks/results/int8_tune.json (int8_tune-fp8-block.json; or under $OUT).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common, quant_gemm as qg  # noqa: E402

DEFAULT_M = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]


def _time(fn_of_w, ws, args, cuda) -> float:
    return qg.time_over_weights(fn_of_w, ws, args.reps, args.min_calls, cuda)


def _int_mm(x_q, x_s, w):
    """The replaced path: torch._int_mm (M padded to 32 when <= 16), scales in PyTorch."""
    from raylm.kernels import quant as quant_gemm

    m = x_q.shape[0]
    a = F.pad(x_q, (0, 0, 0, 32 - m)) if m <= 16 else x_q
    return quant_gemm._scale_epilogue(torch._int_mm(a, w["w_q"].t())[:m], x_s, w["w_scale"], None, torch.bfloat16)


def candidates(m: int, cuda: bool, block_scaled: bool = False) -> list:
    from raylm.kernels import quant as quant_gemm

    if not cuda:
        return [quant_gemm.I8Config(16, 32, 32, 1, 1, 1, 1),
                quant_gemm.I8Config(32, 16, 16 if block_scaled else 64, 1, 1, 1, 1)]
    pow2 = max(16, 1 << (m - 1).bit_length())
    blocks_m = [pow2] if pow2 <= 64 else [64, 128]
    blocks_k = [64, 128] if block_scaled else [64, 128, 256]
    return [quant_gemm.I8Config(bm, bn, bk, 1, 1 if bm == pow2 and pow2 <= 64 else 8, w, s)
            for bm, bn, bk, w, s in itertools.product(blocks_m, [64, 128, 256], blocks_k, [4, 8], [3, 4])]


class _Format:
    """What the sweep times for one --format: the activation quantization, the kernel at
    a tile, the tile production picks, and the path it is compared with."""

    def __init__(self, name: str, group_size: int):
        from raylm.kernels import quant as quant_gemm

        self.name = name
        if name == "int8":
            self.weight_fmt, self.baseline, self.baseline_fmt = "w8a8-int8", "int_mm", "w8a8-int8"
            self.current = quant_gemm.pick_int8_config
            self.base_call = lambda q, s, w: _int_mm(q, s, w)
        else:
            self.weight_fmt, self.baseline, self.baseline_fmt = "fp8-block", "fp8_per_channel", "fp8"
            self.current = lambda m, k, n: quant_gemm.fp8_block_config(m, k, n, group_size)
            self.base_call = lambda q, s, w: quant_gemm.fp8_gemm(q, s, w["w_q"], w["w_scale"])
        self.quant, gemm = qg.quant_and_gemm(self.weight_fmt, group_size)
        self.gemm = lambda q, s, w, cfg: gemm(q, s, w["w_q"], w["w_scale"], config=cfg)
        self.base_quant = qg.quant_and_gemm(self.baseline_fmt, group_size)[0]


def run(args, save) -> dict:
    from raylm.kernels import quant as quant_gemm

    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = qg.SMOKE_SHAPES if args.smoke else qg.LLAMA_8B_SHAPES
    group_size = 32 if args.smoke else qg.GROUP_SIZE
    fmt = _Format(args.format, group_size)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, k, n in shapes:
        for wf in {"bf16", fmt.weight_fmt, fmt.baseline_fmt}:
            one = qg.make_weights(wf, k, n, dtype, gen, device, group_size)
            copies = 1 if args.smoke else max(1, min(64, -(-qg.L2_FLUSH_BYTES // qg.weight_bytes(one))))
            weights[name, wf] = [one] + [qg.make_weights(wf, k, n, dtype, gen, device, group_size)
                                         for _ in range(copies - 1)]
    result = common.base_result("int8_tune" if args.format == "int8" else f"int8_tune-{args.format}",
                                "llama-3.1-8b shapes" if cuda else "smoke shapes")
    result.update({"m": args.m, "format": args.format, "baseline": fmt.baseline,
                   "shapes": [{"name": s, "k": k, "n": n} for s, k, n in shapes]})
    rows, summary = [], {}

    def record(path, shape, k, n, m, cfg, seconds):
        rows.append({"path": path, "shape": shape, "k": k, "n": n, "m": m,
                     "config": cfg._asdict() if cfg else None, "time_us": seconds * 1e6})

    for m in args.m:
        xs = {k: torch.randn(m, k, generator=gen, device=device, dtype=dtype) for _, k, _ in shapes}
        qs = {k: fmt.quant(x) for k, x in xs.items()}
        base_qs = {k: fmt.base_quant(x) for k, x in xs.items()}
        layer = {"bf16": 0.0, fmt.baseline: 0.0, "act_quant": 0.0, "current": 0.0}
        for name, k, n in shapes:
            x, (x_q, x_s) = xs[k], qs[k]
            t = _time(lambda w: (lambda: torch.matmul(x, w["w"].t())), weights[name, "bf16"], args, cuda)
            record("bf16", name, k, n, m, None, t)
            layer["bf16"] += t
            if cuda:
                bq, bs = base_qs[k]
                t = _time(lambda w: (lambda: fmt.base_call(bq, bs, w)), weights[name, fmt.baseline_fmt], args, cuda)
                record(fmt.baseline, name, k, n, m, None, t)
                layer[fmt.baseline] += t
            t = _time(lambda w: (lambda: fmt.quant(x)), [None], args, cuda)
            record("act_quant", name, k, n, m, None, t)
            layer["act_quant"] += t
            cfg = fmt.current(m, k, n)
            t = _time(lambda w: (lambda: fmt.gemm(x_q, x_s, w, cfg)), weights[name, fmt.weight_fmt], args, cuda)
            record("current", name, k, n, m, cfg, t)
            layer["current"] += t
        scored = []
        for base in candidates(m, cuda, block_scaled=args.format != "int8"):
            total = 0.0
            for name, k, n in shapes:
                cfg = quant_gemm.int8_with_split(base, m, k, n)
                x_q, x_s = qs[k]
                t = _time(lambda w: (lambda: fmt.gemm(x_q, x_s, w, cfg)), weights[name, fmt.weight_fmt], args, cuda)
                record("triton", name, k, n, m, cfg, t)
                total += t
            scored.append((total, base))
        scored.sort(key=lambda p: p[0])
        best_t, best = scored[0]
        summary[m] = {"best_config": best._asdict(), "best_us": best_t * 1e6,
                      **{f"{p}_us": v * 1e6 for p, v in layer.items()},
                      "best_speedup_vs_bf16": layer["bf16"] / best_t,
                      "best_with_act_quant_speedup_vs_bf16": layer["bf16"] / (best_t + layer["act_quant"]),
                      "current_with_act_quant_speedup_vs_bf16": layer["bf16"] / (layer["current"] + layer["act_quant"]),
                      "top5": [{"config": c._asdict(), "us": t * 1e6} for t, c in scored[:5]]}
        print(f"M={m}: best {best} {best_t * 1e6:.1f} us/layer; current {layer['current'] * 1e6:.1f}; "
              f"bf16 {layer['bf16'] * 1e6:.1f}; {fmt.baseline} {layer[fmt.baseline] * 1e6:.1f}; act quant "
              f"{layer['act_quant'] * 1e6:.1f}; best+quant {summary[m]['best_with_act_quant_speedup_vs_bf16']:.2f}x bf16",
              flush=True)
        del xs, qs, base_qs
        result["rows"], result["summary"] = rows, summary
        save(result)  # after every M: a run cut off by a time limit keeps what finished
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_M,
                   help="comma-separated batch sizes (tokens)")
    p.add_argument("--format", choices=["int8", "fp8-block"], default="int8")
    qg.add_timing_args(p)
    args = qg.parse_timing_args(p)
    if args.smoke:
        args.m = [1, 17]
    name = "int8_tune" if args.format == "int8" else f"int8_tune-{args.format}"
    run(args, lambda result: common.save_result(result, f"{name}-smoke" if args.smoke else name))


if __name__ == "__main__":
    main()
