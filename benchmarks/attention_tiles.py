"""Tile sweep of raylm's Triton attention kernels on one layer's paged KV cache, replayed from
CUDA graphs as benchmarks/attention.py times them, for each head layout (Llama-3.1-8B 32/8/128,
Qwen3-0.6B 16/8/128; block size 16, bf16):

- prefill / mixed steps (raylm/kernels/attention/prefill.py), each (BLOCK_M, BLOCK_N,
  num_warps, num_stages): one fresh prompt of 512 / 2k / 8k tokens; attention.py's mixed step
  (a 512-token chunk after 2k cached beside 64 decodes at 4k); a serving step (a 560-token
  prompt beside 156 decodes at 850 tokens, the Llama serving benchmark's mean batch);
- decode steps (raylm/kernels/attention/decode.py), each (BLOCK_N, num_warps, num_stages) at
  the kernel's split count, or (BLOCK_N, num_warps, num_stages, waves, max_splits) with the
  split rule's two knobs: batch 256 at 700 and 1,500 tokens, 64 at 4k, 16 at 2k, 4 at 8k, and
  1 at 1k, 8k and 32k.

Beside each kernel's default, and with --baseline-prefill / --baseline-decode FILE (a copy of
an earlier kernel file), that kernel at its own default in the same run: the A/B of a kernel
change and the data for the default tile rules. Every variant's output is compared with the
first variant's (max_abs_diff_vs_first).

Writes attention_tiles.json under $OUT (or benchmarks/results/). --smoke: the CPU (Triton's
interpreter), tiny shapes, two variants, eager wall-clock timing.
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
from raylm.kernels.attention import decode, prefill  # noqa: E402

LAYOUTS = {"llama-3.1-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}
PREFILL_SHAPES = {
    "prefill 512": [(0, 512)],
    "prefill 2048": [(0, 2048)],
    "prefill 8192": [(0, 8192)],
    "mixed 512 after 2k + 64 decodes at 4k": [(2048, 512)] + [(4095, 1)] * 64,
    "serving: 560 new + 156 decodes at 850": [(0, 560)] + [(849, 1)] * 156,
}
DECODE_SHAPES = {f"decode {b} x {c}": [(c - 1, 1)] * b
                 for b, c in [(256, 700), (256, 1500), (64, 4096), (16, 2048), (1, 1024), (1, 8192),
                              (1, 32768), (4, 8192)]}
# prefill: (BLOCK_M, BLOCK_N, num_warps, num_stages); decode: (BLOCK_N, num_warps, num_stages);
# None: the kernel's default.
PREFILL_TILES = [None, (64, 64, 4, 3), (64, 32, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
                 (128, 32, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2)]
DECODE_TILES = [None, (32, 4, 2), (32, 4, 3), (64, 4, 3), (64, 4, 4), (32, 2, 3), (64, 8, 3), (128, 4, 2),
                (16, 4, 3),
                # (BLOCK_N, warps, stages, waves, max_splits): more splits where few sequences leave
                # SMs idle (the default rule: 2 waves, at most MAX_SPLITS)
                (64, 4, 3, 2, 16), (64, 4, 3, 2, 32), (64, 4, 3, 2, 64), (128, 4, 3, 2, 64), (32, 4, 3, 2, 64),
                (32, 4, 3, 2, 32)]


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prefill_call(mod, tiles, q, cache, meta, scale):
    kw = {} if tiles is None else dict(block_m=tiles[0], block_n=tiles[1], num_warps=tiles[2],
                                       num_stages=tiles[3])
    return lambda: mod.paged_prefill_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                               scale, meta.max_query_len, **kw)


def decode_call(mod, tiles, q, cache, meta, scale):
    kw = {} if tiles is None else dict(block_n=tiles[0], num_warps=tiles[1], num_stages=tiles[2])
    # A 5-tuple also sets the split rule: programs for `waves` times the SMs, at most max_splits.
    split_kw = {} if tiles is None or len(tiles) < 5 else dict(waves=tiles[3], max_splits=tiles[4])
    splits = mod.decode_num_splits(q.shape[0], cache.shape[3], q.device, **split_kw)
    return lambda: mod.paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale,
                                              num_splits=splits, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-prefill", help="an earlier prefill.py, timed at its default tiles beside this one")
    p.add_argument("--baseline-decode", help="an earlier decode.py, timed at its default tiles beside this one")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--models", default=",".join(LAYOUTS))
    p.add_argument("--ops", default="prefill,decode")
    p.add_argument("--smoke", action="store_true",
                   help="CPU (TRITON_INTERPRET=1), tiny shapes, two tiles, eager wall-clock timing")
    args = p.parse_args()
    kernels = {"prefill": (prefill, PREFILL_SHAPES, PREFILL_TILES, prefill_call, args.baseline_prefill),
               "decode": (decode, DECODE_SHAPES, DECODE_TILES, decode_call, args.baseline_decode)}
    device = "cuda"
    if args.smoke:
        kernels["prefill"] = (prefill, {"prefill 40": [(0, 40)], "mixed 24 after 40 + 3 decodes": [(40, 24)] + [(49, 1)] * 3},
                              [None, (32, 16, 4, 2)], prefill_call, args.baseline_prefill)
        kernels["decode"] = (decode, {"decode 3 x 50": [(49, 1)] * 3}, [None, (16, 4, 3), (16, 4, 3, 8, 64)], decode_call,
                             args.baseline_decode)
        device = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("attention_tiles.py needs a GPU (or --smoke)")
    peaks = device_peaks(torch.cuda.get_device_name() if device == "cuda" else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for op in args.ops.split(","):
        mod, shapes, tiles_list, call, baseline = kernels[op]
        base = load_module(baseline, f"{op}_baseline") if baseline else None
        for model in args.models.split(","):
            heads, kv_heads, head_dim = LAYOUTS[model]
            for shape, seqs in shapes.items():
                meta, num_blocks = make_step(seqs, args.block_size, device)
                cache = torch.empty(2, num_blocks, args.block_size, kv_heads, head_dim, device=device,
                                    dtype=dtype).normal_()
                q = torch.randn(int(meta.query_start_loc[-1]), heads, head_dim, device=device, dtype=dtype)
                scale = head_dim ** -0.5
                ref = None
                variants = [("baseline", base, None)] if base else []
                variants += [("default" if t is None else "tiles", mod, t) for t in tiles_list]
                for label, m, tiles in variants:
                    attend = call(m, tiles, q, cache, meta, scale)
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
                        print(f"{op} {model} {shape} {label} {tiles}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        if device == "cuda":
                            torch.cuda.synchronize()
                    row = {"op": op, "model": model, "shape": shape, "variant": label, "tiles": tiles, "us": us,
                           "max_abs_diff_vs_first": err,
                           "floor_us": floor_us(seqs, heads, kv_heads, head_dim, 2, peaks)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = common.base_result("attention_tiles", args.models)
    result.update({"block_size": args.block_size, "rows": rows,
                   "baseline_prefill": args.baseline_prefill, "baseline_decode": args.baseline_decode})
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "attention_tiles.json"), "w") as f:
        json.dump(result, f, indent=1)
    for key in dict.fromkeys((r["op"], r["model"], r["shape"]) for r in rows):
        rs = [r for r in rows if (r["op"], r["model"], r["shape"]) == key and r["us"]]
        if not rs:
            continue
        best = min(rs, key=lambda r: r["us"])
        line = " ".join(f"{r['variant'][:4]}{'' if r['tiles'] is None else r['tiles']}={r['us']:.1f}" for r in rs)
        print(f"== {' | '.join(key)} | best {best['variant']} {best['tiles']} {best['us']:.1f} us "
              f"(floor {best['floor_us']:.1f}) | {line}", flush=True)


if __name__ == "__main__":
    main()
