"""Quantized GEMMs against bf16 cuBLAS at Llama-3.1-8B's linear shapes (qkv 4096->6144,
o 4096->4096, gate_up 4096->28672, down 14336->4096), decode M in {1, 16, 64} and
prefill M in {512, 4096}, on random packed weights built here:

- bf16: torch.matmul (cuBLAS), the baseline;
- w4a16-gptq: quant_gemm.w4a16_gemm, GPTQ layout, group 128, qzeros and the in-order
  g_idx, as GPTQLinearMethod calls it; w4a16-gptq-no-gidx: the same without g_idx (the
  kernel then loads one row of scales per K tile);
- w4a16-awq: quant_gemm.w4a16_gemm, AWQ layout, group 128;
- w4a16-w4r: quant_gemm.w4r_gemm, the layout every 4-bit layer (GPTQ, AWQ,
  compressed-tensors) is repacked into on the GPU, group 128, with zero points;
- w8a8-int8: quant_gemm.w8a8_int8_gemm, with and without quant_act.per_token_quant_int8;
- fp8: quant_gemm.fp8_gemm, with and without quant_act.per_token_quant_fp8;
- fp8-block: quant_gemm.fp8_block_gemm, HF fp8 checkpoints' 128x128 weight blocks with
  activations quantized per 128 channels (per_token_quant_fp8(x, 128)), with and without
  that quantization; fp8-block-cublas: the same product through cuBLAS's block scaling
  (quant_gemm.fp8_block_scaled_mm, torch._scaled_mm; Hopper, CUDA 12.9+).

Each point is a CUDA graph of back-to-back calls replayed N times and timed with CUDA
events (median), so Python launch overhead is not counted; the calls cycle through
enough weight copies (>= 256 MiB) that the weights come from HBM, not the 50 MB L2.
Roofline: floor = max(bytes moved / measured copy bandwidth, FLOPs / measured peak of the
format's own GEMM at 8192^3); `bound` says which term wins (memory for small M).

    python benchmarks/quant_gemm.py              # H100: a few minutes (estimate, not yet run)
    python benchmarks/quant_gemm.py --smoke      # CPU, Triton interpreter, tiny shapes

Writes benchmarks/results/quant_gemm.json (or under $OUT).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

# (name, K, N) of Llama-3.1-8B's linear layers (gate_up fused: 2 x 14336).
LLAMA_8B_SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
DECODE_M = [1, 16, 64]
PREFILL_M = [512, 4096]
SMOKE_SHAPES = [("qkv", 128, 128), ("down", 256, 128)]  # fp8-block-cublas: multiples of 128
SMOKE_M = [1, 17]
GROUP_SIZE = 128
FORMATS = ("bf16", "w4a16-gptq", "w4a16-gptq-no-gidx", "w4a16-awq", "w4a16-w4r", "w8a8-int8", "fp8", "fp8-block",
           "fp8-block-cublas")
ACT_QUANT_FORMATS = ("w8a8-int8", "fp8", "fp8-block", "fp8-block-cublas")
L2_FLUSH_BYTES = 256 << 20  # > 5x H100's L2


# ---------------------------------------------------------------- operands

def _rand_int32(shape, gen, device):
    return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, generator=gen, device=device, dtype=torch.int32)


def make_weights(fmt: str, k: int, n: int, dtype: torch.dtype, gen, device: str, group_size: int) -> dict:
    """Random weights of one format for a K -> N linear layer."""
    if fmt == "bf16":
        return {"w": (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)}
    if fmt.startswith("w4a16"):
        groups = k // group_size
        scales = (torch.rand(groups, n, generator=gen, device=device) * 0.01 + 1e-3).half()
        if fmt == "w4a16-w4r":  # zb: 128 + the zero point, in the activation dtype
            zb = (128 + torch.randint(0, 16, (groups, n), generator=gen, device=device)).to(dtype)
            return {"qweight": _rand_int32((k // 8, n), gen, device), "scales": scales.to(dtype), "zb": zb}
        if fmt == "w4a16-awq":
            return {"qweight": _rand_int32((k, n // 8), gen, device), "scales": scales,
                    "qzeros": _rand_int32((groups, n // 8), gen, device), "g_idx": None}
        g_idx = None
        if fmt == "w4a16-gptq":  # what GPTQLinearMethod passes for desc_act false
            g_idx = (torch.arange(k, device=device) // group_size).int()
        return {"qweight": _rand_int32((k // 8, n), gen, device), "scales": scales,
                "qzeros": _rand_int32((groups, n // 8), gen, device), "g_idx": g_idx}
    w_scale = torch.rand(n, generator=gen, device=device) * 1e-3 + 1e-4
    if fmt == "fp8-block":  # one scale per 128x128 block, expanded over rows as FP8BlockLinearMethod keeps it
        w_scale = torch.rand(-(-n // group_size), k // group_size, generator=gen, device=device) * 1e-3 + 1e-4
        w_scale = w_scale.repeat_interleave(group_size, 0)[:n].t().contiguous().t()  # group-major
    if fmt == "fp8-block-cublas":  # the same blocks, laid out for torch._scaled_mm
        from raylm.kernels import quant as quant_gemm

        blocks = torch.rand(n // 128, k // 128, generator=gen, device=device) * 1e-3 + 1e-4  # always 128x128
        w_scale = quant_gemm.block_scales_for_cublas(blocks.repeat_interleave(128, 0))
    if fmt == "w8a8-int8":
        w_q = torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
    else:
        w_q = (torch.randn(n, k, generator=gen, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"w_q": w_q, "w_scale": w_scale}


def weight_bytes(w: dict) -> int:
    return sum(t.numel() * t.element_size() for t in w.values() if t is not None)


def quant_and_gemm(fmt: str, group_size: int):
    """(activation quantization x -> (x_q, x_scale), GEMM (x_q, x_scale, w_q, w_scale,
    **kw)) of an 8-bit format, as its linear layers call them."""
    from raylm.kernels import quant as quant_gemm
    from raylm.kernels.quant import act as quant_act

    if fmt == "w8a8-int8":
        return (lambda t: quant_act.per_token_quant_int8(t, "vllm")), quant_gemm.w8a8_int8_gemm
    if fmt == "fp8-block":
        return (lambda t: quant_act.per_token_quant_fp8(t, group_size, group_major=True),
                lambda x_q, x_s, w_q, w_s, **kw: quant_gemm.fp8_block_gemm(x_q, x_s, w_q, w_s, group_size, **kw))
    if fmt == "fp8-block-cublas":  # 128-channel groups whatever group_size says
        return (lambda t: quant_act.per_token_quant_fp8(t, 128, group_major=True),
                quant_gemm.fp8_block_scaled_mm)
    return quant_act.per_token_quant_fp8, quant_gemm.fp8_gemm


def make_call(fmt: str, w: dict, x: torch.Tensor, group_size: int, act_quant: bool):
    """A no-argument function running one GEMM of `fmt` on x (and, for the 8-bit formats
    with act_quant, the per-token activation quantization before it)."""
    from raylm.kernels import quant as quant_gemm

    if fmt == "bf16":
        wt = w["w"].t()  # [K, N] view of nn.Linear's [N, K]: cuBLAS reads it transposed
        return lambda: torch.matmul(x, wt)
    if fmt == "w4a16-w4r":
        return lambda: quant_gemm.w4r_gemm(x, w["qweight"], w["scales"], w["zb"], group_size)
    if fmt.startswith("w4a16"):
        layout = "awq" if fmt == "w4a16-awq" else "gptq"
        zero_offset = 1 if layout == "gptq" else 0  # GPTQ v1 checkpoints store zero - 1
        return lambda: quant_gemm.w4a16_gemm(x, w["qweight"], w["scales"], w["qzeros"], w["g_idx"],
                                             group_size, layout, zero_offset=zero_offset)
    quant, gemm = quant_and_gemm(fmt, group_size)
    if act_quant:
        def call():
            x_q, x_s = quant(x)
            return gemm(x_q, x_s, w["w_q"], w["w_scale"], out_dtype=x.dtype)
        return call
    x_q, x_s = quant(x)
    return lambda: gemm(x_q, x_s, w["w_q"], w["w_scale"], out_dtype=x.dtype)


# ---------------------------------------------------------------- timing

def time_calls(calls: list, reps: int, cuda: bool) -> tuple[float, str]:
    """Median seconds per call of `calls` run back to back: on CUDA, one graph of all of
    them replayed `reps` times between CUDA events (eager with events if capture fails);
    on CPU, perf_counter."""
    if not cuda:
        for c in calls:
            c()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t) / len(calls))
        return statistics.median(times), "cpu"
    for c in calls:  # compile and autotune outside the capture
        c()
    torch.cuda.synchronize()
    mode = "cuda_graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run = graph.replay
        run()
    except Exception as e:  # noqa: BLE001 - fall back to eager timing, and say so
        print(f"  graph capture failed ({type(e).__name__}: {e}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for c in calls:
                c()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 / len(calls) for s, e in pairs]
    return statistics.median(times), mode


def time_over_weights(fn_of_w, weights: list, reps: int, min_calls: int, cuda: bool) -> float:
    """time_calls of fn_of_w(w) for every weight copy w, repeated to at least min_calls
    calls; a configuration that fails (e.g. does not compile) prints why and times as
    inf, so a tuning sweep skips it."""
    calls = [fn_of_w(w) for w in weights]
    calls = calls * max(1, -(-min_calls // len(calls)))
    try:
        seconds, _ = time_calls(calls, reps, cuda)
    except Exception as e:  # noqa: BLE001 - skip the configuration, say so
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return float("inf")
    return seconds


def measure_format_peak(fmt: str, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of the format's own GEMM at n x n x n (bf16 for bf16 and W4A16, whose
    dequantized tiles run on the bf16 tensor cores)."""
    if fmt == "bf16" or fmt.startswith("w4a16"):
        return common.measure_matmul_peak(n)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = make_weights(fmt, n, n, torch.bfloat16, gen, "cuda", GROUP_SIZE)
    x = torch.randn(n, n, generator=gen, device="cuda", dtype=torch.bfloat16)
    seconds, _ = time_calls([make_call(fmt, w, x, GROUP_SIZE, act_quant=False)], reps, cuda=True)
    return 2 * n ** 3 / seconds


def bytes_moved(fmt: str, w: dict, m: int, k: int, n: int, act_quant: bool) -> int:
    """What an ideal kernel must read and write: the weight (packed, with scales, zeros,
    g_idx), the activations in their GEMM dtype, the bf16 output; with act_quant also the
    bf16 activations read by the quantization."""
    act = 2 if fmt == "bf16" or fmt.startswith("w4a16") else 1
    extra = (2 * m * k + 4 * m) if act_quant else 4 * m  # bf16 in (+ per-token scales)
    return weight_bytes(w) + act * m * k + 2 * m * n + (extra if act == 1 else 0)


# ---------------------------------------------------------------- main

def run(args) -> dict:
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's w4a16 wants float32
    shapes = SMOKE_SHAPES if args.smoke else LLAMA_8B_SHAPES
    ms = SMOKE_M if args.smoke else args.m
    group_size = 32 if args.smoke else GROUP_SIZE
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in FORMATS:
            raise SystemExit(f"--formats: {f!r} is not one of {FORMATS}")
    if cuda and torch.cuda.get_device_capability() < (8, 9):
        for f in [f for f in formats if f.startswith("fp8")]:
            formats.remove(f)
            print(f"{f} needs sm89+: skipped", flush=True)

    result = common.base_result("quant_gemm", "llama-3.1-8b shapes" if cuda else "smoke shapes")
    result.update({"group_size": group_size, "reps": args.reps, "dtype": str(dtype).replace("torch.", ""),
                   "formats": formats, "m": ms,
                   "shapes": [{"name": s, "k": k, "n": n} for s, k, n in shapes]})
    if cuda:
        bandwidth = common.measure_bandwidth()
        bf16_peak = common.measure_matmul_peak()
        peaks = {f: bf16_peak if f == "bf16" or f.startswith("w4a16") else measure_format_peak(f)
                 for f in formats}
        print(f"measured: copy {bandwidth / 1e12:.2f} TB/s; GEMM peak at 8192^3: "
              + ", ".join(f"{f} {p / 1e12:.0f} TFLOP/s" for f, p in peaks.items()), flush=True)
    else:
        bandwidth, peaks = None, {f: None for f in formats}
    result["measured_bandwidth_Bps"] = bandwidth
    result["measured_peak_flops"] = peaks

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, k, n in shapes:
        for fmt in formats:
            one = make_weights(fmt, k, n, dtype, gen, device, group_size)
            copies = 1 if args.smoke else max(1, min(64, -(-L2_FLUSH_BYTES // weight_bytes(one))))
            weights = [one] + [make_weights(fmt, k, n, dtype, gen, device, group_size) for _ in range(copies - 1)]
            for m in ms:
                x = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
                variants = [False, True] if fmt in ACT_QUANT_FORMATS else [False]
                for act_quant in variants:
                    calls = [make_call(fmt, w, x, group_size, act_quant) for w in weights]
                    calls = calls * max(1, -(-args.min_calls // len(calls)))
                    seconds, mode = time_calls(calls, args.reps, cuda)
                    rows.append(_row(name, k, n, m, fmt, act_quant, seconds, mode, weights[0],
                                     bandwidth, peaks[fmt], copies))
                    print(f"{name:8s} M={m:5d} {fmt:20s}{' +act' if act_quant else '     '} "
                          f"{seconds * 1e6:9.1f} us  roofline {_fmt(rows[-1]['fraction_of_roofline'])}",
                          flush=True)
                del x
            del weights, one
            if cuda:
                torch.cuda.empty_cache()
    _add_speedups(rows)
    result["rows"] = rows
    result["summary"] = _summary(rows, formats)
    return result


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def _row(name, k, n, m, fmt, act_quant, seconds, mode, w, bandwidth, peak, copies) -> dict:
    flops = 2 * m * n * k
    nbytes = bytes_moved(fmt, w, m, k, n, act_quant)
    row = {"shape": name, "k": k, "n": n, "m": m, "phase": "decode" if m <= 64 else "prefill",
           "format": fmt, "act_quant_included": act_quant, "time_us": seconds * 1e6, "timing": mode,
           "weight_copies": copies, "bytes": nbytes, "flops": flops,
           "achieved_Bps": nbytes / seconds, "achieved_flops": flops / seconds,
           "memory_floor_us": None, "compute_floor_us": None, "bound": None, "fraction_of_roofline": None}
    if bandwidth and peak:
        mem, comp = nbytes / bandwidth, flops / peak
        row.update({"memory_floor_us": mem * 1e6, "compute_floor_us": comp * 1e6,
                    "bound": "memory" if mem >= comp else "compute",
                    "fraction_of_roofline": max(mem, comp) / seconds})
    return row


def _add_speedups(rows: list) -> None:
    base = {(r["shape"], r["m"]): r["time_us"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        b = base.get((r["shape"], r["m"]))
        r["speedup_vs_bf16"] = None if b is None else b / r["time_us"]


def _summary(rows: list, formats: list) -> dict:
    """Per format and M: time summed over the four shapes (one decoder layer's GEMMs) and
    its speed-up against bf16; the 8-bit formats with their activation quantization."""
    out = {}
    for fmt in formats:
        for m in sorted({r["m"] for r in rows}):
            sel = [r for r in rows if r["format"] == fmt and r["m"] == m
                   and r["act_quant_included"] == (fmt in ACT_QUANT_FORMATS)]
            base = [r for r in rows if r["format"] == "bf16" and r["m"] == m]
            if not sel:
                continue
            t = sum(r["time_us"] for r in sel)
            out[f"{fmt}@M={m}"] = {"layer_gemm_us": t, "speedup_vs_bf16":
                                   sum(r["time_us"] for r in base) / t if base else None}
    return out


def add_timing_args(p) -> None:
    """--reps, --min-calls and --smoke, as the GEMM benchmarks and tuners share them."""
    p.add_argument("--reps", type=int, default=20, help="graph replays; the median is reported")
    p.add_argument("--min-calls", type=int, default=8, help="at least this many calls per graph")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")


def parse_timing_args(p):
    """p's arguments; with --smoke the kernels switch to Triton's interpreter and each
    point is timed once, otherwise a CUDA GPU is required."""
    args = p.parse_args()
    if args.smoke:
        from raylm.kernels.interpret import use_interpreter

        use_interpreter()
        args.reps, args.min_calls = 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU; --smoke runs tiny shapes on CPU")
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=DECODE_M + PREFILL_M,
                   help="comma-separated batch sizes (tokens)")
    add_timing_args(p)
    args = parse_timing_args(p)
    result = run(args)
    common.save_result(result, "quant_gemm-smoke" if args.smoke else "quant_gemm")


if __name__ == "__main__":
    main()
