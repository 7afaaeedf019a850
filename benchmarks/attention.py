"""Attention backends per operation: triton, flashinfer and flash_attn (FlashAttention-4)
on one layer's paged KV cache, at a model's head layout (default Llama-3.1-8B: 32 query
heads, 8 kv heads, head_dim 128; bf16):

- decode: batch 1 / 64 / 256 x context 1k / 8k / 32k (one new token per sequence),
- prefill: one fresh prompt of 128 / 2k / 8k tokens,
- mixed: a chunk of 512 prompt tokens after 2k cached ones, beside 64 decodes at 4k.

Each point is the backend's `attend` (the step's plan made once, outside the timing, as
the first layer of a step makes it), replayed from a CUDA graph of 10 calls so launch
overhead is left out as the engine's graphs leave it out (`"timed": "eager"` where the
capture fails, or with --eager), the mean over enough calls to fill ~50 ms, against
its floor: the larger of the KV bytes over the HBM bandwidth and the attention FLOPs over
the bf16 tensor-core peak (the datasheet numbers of the GPU it ran on, below). A backend that is not installed
or refuses a shape gets a row with `us` null and the reason in `refused`.

Writes benchmarks/results/attention_<date>.json (or under $OUT) and a .png beside it.
--quick runs a third of the points; the full sweep takes about two minutes on an H200
once FlashInfer's and FA4's kernels are compiled (their first use compiles them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from raylm.workers.attention_backends import AttentionMetadata, get_attention_backend  # noqa: E402

# Datasheets: H200 SXM (nvidia.com/en-us/data-center/h200) 4.8 TB/s HBM3e; H100 SXM 80GB
# (nvidia.com/en-us/data-center/h100) 3.35 TB/s HBM3; both 989 TFLOP/s dense bf16 tensor-core
# (1,979 with sparsity). Measured on the H200: ~4.3 TB/s copy, ~790 TFLOP/s.
PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}  # (HBM bytes/s, bf16 FLOP/s)


def device_peaks(name: str) -> tuple[float, float]:
    """(HBM bytes/s, dense bf16 FLOP/s) of the GPU called `name`; the H200's for one not listed."""
    return next((v for k, v in PEAKS.items() if k in name), PEAKS["H200"])


BACKENDS = ("triton", "flashinfer", "flash_attn")
DECODE_BATCHES = (1, 64, 256)
DECODE_CONTEXTS = (1024, 8192, 32768)
PREFILL_TOKENS = (128, 2048, 8192)
# (cached, new) per sequence of the mixed step.
MIXED = [(2048, 512)] + [(4096, 1)] * 64


def make_step(seqs, block_size: int, device="cuda"):
    """Metadata for sequences given as (cached, new) over consecutive blocks, and the
    number of blocks they use."""
    tables, slots, starts, n0 = [], [], [0], 0
    for cached, new in seqs:
        n = -(-(cached + new) // block_size)
        table = list(range(n0, n0 + n))
        n0 += n
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        starts.append(starts[-1] + new)
    width = max(len(t) for t in tables)
    seq_lens = [c + n for c, n in seqs]
    query_lens = [n for _, n in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return meta, n0


def floor_us(seqs, heads: int, kv_heads: int, head_dim: int, elem: int,
             peaks: tuple[float, float] = PEAKS["H200"]) -> float:
    """max(KV bytes read / bandwidth, causal attention FLOPs / peak), in microseconds."""
    kv_bytes = sum(c + n for c, n in seqs) * kv_heads * head_dim * 2 * elem
    visible = sum(n * c + n * (n + 1) // 2 for c, n in seqs)  # keys seen, summed over queries
    flops = 4 * heads * head_dim * visible  # QK^T and PV, 2 FLOPs per multiply-add
    return max(kv_bytes / peaks[0], flops / peaks[1]) * 1e6


def graphed(fn, calls: int = 10):
    """fn captured `calls` times in one CUDA graph, and the number of calls per replay."""
    fn()  # compile and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay, calls


def time_us(fn, target_s: float = 0.05, per_call: int = 1) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    iters = max(3, min(1000, int(target_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters / per_call


def points(quick: bool):
    """(op, batch_size, context_len, num_tokens, seqs) of the sweep."""
    batches = DECODE_BATCHES[:2] if quick else DECODE_BATCHES
    contexts = DECODE_CONTEXTS[:2] if quick else DECODE_CONTEXTS
    for b in batches:
        for ctx in contexts:
            yield "decode", b, ctx, b, [(ctx - 1, 1)] * b
    for t in (PREFILL_TOKENS[:2] if quick else PREFILL_TOKENS):
        yield "prefill", 1, t, t, [(0, t)]
    yield "mixed", len(MIXED), max(c + n for c, n in MIXED), sum(n for _, n in MIXED), MIXED


def run_point(backend, seqs, args, layout, kv_dtype):
    heads, kv_heads, head_dim = layout
    meta, num_blocks = make_step(seqs, args.block_size)
    cache = torch.empty(2, num_blocks, args.block_size, kv_heads, head_dim, device="cuda",
                        dtype=torch.bfloat16).normal_()
    cache = cache.to(kv_dtype)
    q = torch.randn(int(meta.query_start_loc[-1]), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim ** -0.5

    def attend():
        return backend.attend(q, cache, meta, scale)

    if not args.eager:
        try:
            replay, calls = graphed(attend)
            return time_us(replay, per_call=calls), "graph"
        except RuntimeError as e:  # not capturable: say so, time it eagerly
            print(f"{backend.name}: CUDA graph capture failed ({e}); timing eagerly", flush=True)
            torch.cuda.synchronize()
    return time_us(attend), "eager"


def run(args) -> dict:
    cfg = json.load(open(os.path.join(common.MODELS, args.model, "config.json")))
    heads = cfg["num_attention_heads"]
    layout = (heads, cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // heads)
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    backends = {}
    for name in args.backends:
        try:
            backends[name] = get_attention_backend(name)
        except ImportError as e:
            backends[name] = str(e)
    rows = []
    peaks = device_peaks(common.device_name())
    for op, batch, ctx, tokens, seqs in points(args.quick):
        floor = floor_us(seqs, *layout, kv_dtype.itemsize, peaks)
        for name, backend in backends.items():
            row = {"op": op, "backend": name, "batch_size": batch, "context_len": ctx,
                   "num_tokens": tokens, "us": None, "floor_us": round(floor, 2)}
            if isinstance(backend, str):
                row["refused"] = backend
            else:
                try:
                    us, row["timed"] = run_point(backend, seqs, args, layout, kv_dtype)
                    row["us"] = round(us, 2)
                except ValueError as e:  # a refused shape
                    row["refused"] = str(e)
            print(json.dumps(row), flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    result = common.base_result("attention", args.model)
    result.update({"block_size": args.block_size, "kv_cache_dtype": args.kv_cache_dtype,
                   "heads": layout[0], "kv_heads": layout[1], "head_dim": layout[2],
                   "hbm_bytes_per_s": peaks[0], "bf16_dense_flops": peaks[1],
                   "rows": rows})
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in ("decode", "prefill", "mixed") if any(r["op"] == op for r in result["rows"])]
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in result["rows"] if r["op"] == op]
        labels = list(dict.fromkeys(f"b{r['batch_size']} ctx{r['context_len']}" if op == "decode"
                                    else f"{r['num_tokens']} tok" for r in rows))
        names = list(dict.fromkeys(r["backend"] for r in rows))
        width = 0.8 / (len(names) + 1)
        for i, name in enumerate(names + ["floor"]):
            key = "floor_us" if name == "floor" else "us"
            src = [r for r in rows if r["backend"] == (names[0] if name == "floor" else name)]
            ax.bar([x + i * width for x in range(len(src))], [r[key] or 0 for r in src], width, label=name)
        ax.set_xticks([x + width * len(names) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("us per layer")
        ax.set_title(f"{op} ({result['model']}, block {result['block_size']}, {result['kv_cache_dtype']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="a directory name under benchmarks/models")
    p.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--quick", action="store_true", help="decode batch 1/64 x 1k/8k, prefill 128/2k, mixed")
    p.add_argument("--eager", action="store_true", help="time eager calls (launch overhead included)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    for name in args.backends:
        if name not in BACKENDS:
            raise SystemExit(f"--backends: {name!r} is not one of {BACKENDS}")
    result = run(args)
    stem = f"attention_{datetime.date.today().isoformat()}"
    path = common.save_result(result, stem)
    plot(result, path[:-len(".json")] + ".png")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
