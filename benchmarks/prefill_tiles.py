"""Tile sweep of the Triton prefill / mixed-step attention kernel
(raylm/kernels/attention/prefill.py) on one layer's paged KV cache, replayed from CUDA graphs
as benchmarks/attention.py times it: for each head layout (Llama-3.1-8B 32/8/128, Qwen3-0.6B
16/8/128, block size 16, bf16) and step shape, the microseconds of each (BLOCK_M, BLOCK_N,
num_warps, num_stages), the kernel's default beside them, and, with --baseline FILE (a copy of
an earlier prefill.py), that kernel at its own default in the same run: the A/B of a kernel
change and the data for the default tile rule.

Shapes: one fresh prompt of 512 / 2k / 8k tokens; attention.py's mixed step (a 512-token
chunk after 2k cached beside 64 decodes at 4k); and a serving step (a 560-token prompt
beside 156 decodes at 850 tokens, the Llama serving benchmark's mean batch).

Writes prefill_tiles.json under $OUT (or benchmarks/results/). GPU only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "--smoke" in sys.argv:
    from raylm.kernels.interpret import use_interpreter

    use_interpreter()  # before the kernel modules are imported

from benchmarks import common  # noqa: E402
from benchmarks.attention import device_peaks, floor_us, graphed, make_step, time_us  # noqa: E402
from raylm.kernels.attention import prefill  # noqa: E402

LAYOUTS = {"llama-3.1-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}
SHAPES = {
    "prefill 512": [(0, 512)],
    "prefill 2048": [(0, 2048)],
    "prefill 8192": [(0, 8192)],
    "mixed 512 after 2k + 64 decodes at 4k": [(2048, 512)] + [(4095, 1)] * 64,
    "serving: 560 new + 156 decodes at 850": [(0, 560)] + [(849, 1)] * 156,
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages); None: the kernel's default.
TILES = [None, (64, 64, 4, 3), (64, 32, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
         (128, 32, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2)]


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("prefill_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="an earlier prefill.py, timed at its default tiles beside this one")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--models", default=",".join(LAYOUTS))
    p.add_argument("--smoke", action="store_true",
                   help="CPU (TRITON_INTERPRET=1), tiny shapes, two tiles, eager wall-clock timing")
    args = p.parse_args()
    shapes, tiles_list, device = SHAPES, TILES, "cuda"
    if args.smoke:
        shapes = {"prefill 40": [(0, 40)], "mixed 24 after 40 + 3 decodes at 50": [(40, 24)] + [(49, 1)] * 3}
        tiles_list, device = [None, (32, 16, 4, 2)], "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("prefill_tiles.py needs a GPU (or --smoke)")
    base = load_baseline(args.baseline) if args.baseline else None
    peaks = device_peaks(torch.cuda.get_device_name() if device == "cuda" else "cpu")
    rows = []
    for model in args.models.split(","):
        heads, kv_heads, head_dim = LAYOUTS[model]
        for shape, seqs in shapes.items():
            meta, num_blocks = make_step(seqs, args.block_size, device)
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            cache = torch.empty(2, num_blocks, args.block_size, kv_heads, head_dim, device=device,
                                dtype=dtype).normal_()
            q = torch.randn(int(meta.query_start_loc[-1]), heads, head_dim, device=device, dtype=dtype)
            scale = head_dim ** -0.5
            ref = None
            variants = [("baseline", base, None)] if base else []
            variants += [("default" if t is None else "tiles", prefill, t) for t in tiles_list]
            for label, mod, tiles in variants:
                kw = {} if tiles is None else dict(block_m=tiles[0], block_n=tiles[1], num_warps=tiles[2],
                                                   num_stages=tiles[3])

                def attend(mod=mod, kw=kw):
                    return mod.paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens,
                                                       meta.query_start_loc, scale, meta.max_query_len, **kw)
                try:
                    out = attend()
                    if ref is None:
                        ref = out.float()
                    err = (out.float() - ref).abs().max().item()
                    if device == "cuda":
                        replay, calls = graphed(attend)
                        us = time_us(replay, per_call=calls)
                    else:
                        t0 = time.perf_counter()
                        attend()
                        us = (time.perf_counter() - t0) * 1e6
                except Exception as e:  # noqa: BLE001 - a tile the GPU refuses (shared memory): say so
                    us, err = None, None
                    print(f"{model} {shape} {label} {tiles}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    if device == "cuda":
                        torch.cuda.synchronize()
                row = {"model": model, "shape": shape, "variant": label, "tiles": tiles, "us": us,
                       "max_abs_diff_vs_first": err,
                       "floor_us": floor_us(seqs, heads, kv_heads, head_dim, 2, peaks)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = common.base_result("prefill_tiles", args.models)
    result.update({"block_size": args.block_size, "rows": rows, "baseline": args.baseline})
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "prefill_tiles.json"), "w") as f:
        json.dump(result, f, indent=1)
    for model in args.models.split(","):
        for shape in shapes:
            rs = [r for r in rows if r["model"] == model and r["shape"] == shape and r["us"]]
            best = min(rs, key=lambda r: r["us"])
            line = " ".join(f"{r['variant'][:4]}{'' if r['tiles'] is None else r['tiles']}={r['us']:.1f}" for r in rs)
            print(f"== {model} | {shape} | best {best['variant']} {best['tiles']} {best['us']:.1f} us | {line}",
                  flush=True)


if __name__ == "__main__":
    main()
