"""Structured outputs: 256 requests, each with its own JSON schema (variations of
realistic schemas: a user profile, an order, an address, a tool call's arguments...),
against the same requests unconstrained, in one run, on random weights. The unconstrained
run gives each request as many tokens as its structured output had (ignore_eos), and the
prefix cache is off, so the two runs do the same work but for the grammar.

    python benchmarks/structured.py --model qwen3-0.6b
    python benchmarks/structured.py --device cpu          # smoke: tiny model, 8 requests
    python benchmarks/structured.py --backend guidance    # llguidance instead of xgrammar
    python benchmarks/structured.py --model llama-3.1-8b --standin-step-ms 1.5 --standin-token-us 20
        # the host path alone, on any machine: a stand-in executor sleeps each step's
        # device time (here about an H200 decode step of Llama-3.1-8B at 256 rows) and
        # draws each grammar row's token from its bitmask

Reports output tok/s of both and their ratio, grammar compile time p50/p99 (each
schema is new, so every request compiles; compiles run on a thread pool off the step
loop) and the step time p99 while schemas compile against the unconstrained steps'.
Then the compile probe (`--probe N`, default 64; 0: none): N requests with schemas not yet
compiled arrive beside a steady batch of N decoding unconstrained requests, and the steps
until each has its first token are timed, against the same N requests unconstrained: whether
compiling new schemas slows the steps of the requests already running.
The tokenizer is the embedded SmolLM2's (byte-level BPE, 49k tokens: the weights are
random, the model's own tokenizer is not here); the model's larger vocabulary is padded
and masked. Writes benchmarks/results/structured_<model>.json only on a GPU (under $OUT
when set); `--device cpu` writes only under $OUT; a stand-in run writes
structured_<model>-standin.json (its device says so).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.structured_schemas import make_schemas  # noqa: E402

TOPICS = ["a customer who ordered running shoes", "the weather in Lisbon tomorrow", "a meeting next Tuesday",
          "a bug report about a login page", "a recipe for pancakes", "a flight from Paris to Tokyo"]


def tokenizer_dir() -> str:
    """The embedded SmolLM2 model's directory (its tokenizer files), or
    $RAYLM_BENCH_TOKENIZER_DIR (a copy of them, where the package is not installed)."""
    if os.environ.get("RAYLM_BENCH_TOKENIZER_DIR"):
        return os.environ["RAYLM_BENCH_TOKENIZER_DIR"]
    from raylm.workers.gguf_loader import convert_gguf, default_model_path

    return convert_gguf(default_model_path())


def model_dir(args) -> str:
    """A config (from ../shared/models, or a tiny llama for --device cpu) with the
    SmolLM2 tokenizer files beside it."""
    tok_dir = tokenizer_dir()
    if args.device == "cpu" and args.standin_step_ms is None:
        from transformers import LlamaConfig

        d = tempfile.mkdtemp(prefix="raylm-bench-")
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"]).save_pretrained(d)
    else:
        d = common.model_dir(args.model)
    for name in os.listdir(tok_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tok_dir, name), d)
    return d


def run(llm, prompts, params, tag: str, trace: bool = False) -> dict:
    """Drive the engine step by step: per-step wall times, and whether a grammar was
    compiling (its request waiting for it) when the step ran. `trace`: the core's host
    phases of each pipelined grammar step and the device's timeline of each step too
    (medians of the full-batch steps, see trace_summary)."""
    engine = llm.llm_engine
    core = engine.core
    runner = getattr(core.executor, "runner", None)  # the in-process executor's
    if trace:
        core.step_trace = []
        if runner is not None:
            runner.gpu_trace, runner._trace_last_end = [], None
    # Where the host's step goes: the core's step timing (its grammar_ms_per_step is the
    # time the step loop waited for, or did, the matchers' work).
    core.reset_timing()
    engine.final_outputs_only = True  # as LLM.generate: no per-step snapshots of unfinished requests
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}{i}", prompt, p)
    steps, compiling, running, finished = [], [], [], {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        busy = bool(core._num_compiling)
        rows = core.scheduler.num_running
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        steps.append(time.perf_counter() - t)
        compiling.append(busy)
        running.append(rows)
    elapsed = time.perf_counter() - t0
    engine.final_outputs_only = False
    outs = [finished[f"{tag}{i}"].outputs[0] for i in range(len(prompts))]
    timing = core.timing_summary()
    traced = None
    if trace:
        traced = trace_summary(core.step_trace, runner.gpu_trace if runner is not None else None, len(prompts))
        core.step_trace = None
        if runner is not None:
            runner.gpu_trace = None
    return {"elapsed": elapsed, "steps": steps, "compiling": compiling, "running": running, "outputs": outs,
            "timing": timing, "trace": traced}


def trace_summary(host: list, gpu, n: int) -> dict:
    """Medians (ms) of each traced phase over the steps with at least 3/4 of the n requests:
    the host's phases of a pipelined grammar step (core.step_trace, in the order they run:
    between_ms the engine's work between two core steps, then collect, record (of which
    record_accept_wait), plan, bitmask_wait, finish_sampling, launch), and the device's
    timeline (ModelRunner.gpu_trace: forward, idle before sampling, sampling, idle before
    the forward pass)."""
    def med(rows: list, key: str):
        xs = sorted(r[key] for r in rows if r.get(key) is not None)
        return xs[len(xs) // 2] if xs else None

    out = {}
    for name, rows in (("host", host or []), ("gpu", gpu or [])):
        full = [r for r in rows if r.get("rows", 0) >= 0.75 * n]
        keys = sorted({k for r in full for k in r if k.endswith("_ms")})
        out[name] = {"steps": len(full), **{k: med(full, k) for k in keys}}
    return out


def compile_probe(llm, prompts: list[str], schemas: list[dict], background: int, temperature: float) -> dict:
    """Whether new schemas compiling slow the steps of requests already running: `background`
    unconstrained requests decode in a steady batch; then the probe requests (each with a
    schema never compiled before) arrive at once, and the steps from their arrival until every
    one of them has its first token are timed; then the same requests unconstrained arrive in
    their place (the same prompts, so the same prefill work) and the same is timed. Each arm's
    probe requests are aborted once they all have a token; the background keeps decoding."""
    from raylm import SamplingParams, StructuredOutputsParams

    engine = llm.llm_engine
    core = engine.core
    engine.final_outputs_only = False
    bg = [f"bg{i}" for i in range(background)]
    for i, rid in enumerate(bg):
        engine.add_request(rid, prompts[i % len(prompts)],
                           SamplingParams(temperature=temperature, seed=i, max_tokens=1500, ignore_eos=True))

    def timed_steps(count=None, until=None):
        times, compiling = [], []
        while (count is None or len(times) < count):
            busy = bool(core._num_compiling)
            t = time.perf_counter()
            outs = engine.step()
            times.append(time.perf_counter() - t)
            compiling.append(busy)
            if until is not None and until(outs):
                break
        return times, compiling

    # Steady state: every background request decoding.
    while core.scheduler.num_waiting or any(len(core.requests[r].request.output_token_ids) == 0
                                            for r in bg if r in core.requests):
        engine.step()
    base, _ = timed_steps(count=40)
    arms = {}
    for arm in ("structured", "unconstrained"):
        ids = [f"{arm[0]}probe{i}" for i in range(len(schemas))]
        t0 = time.perf_counter()
        for i, (rid, prompt, schema) in enumerate(zip(ids, prompts, schemas)):
            so = StructuredOutputsParams(json=schema) if arm == "structured" else None
            engine.add_request(rid, prompt, SamplingParams(temperature=temperature, seed=i, max_tokens=64,
                                                           structured_outputs=so))
        waiting = set(ids)

        def all_started(outs):
            for o in outs:
                if o.request_id in waiting and o.outputs and len(o.outputs[0].token_ids) > 0:
                    waiting.discard(o.request_id)
            return not waiting

        times, compiling = timed_steps(until=all_started)
        window_s = time.perf_counter() - t0
        engine.abort_request(ids)
        during = [t for t, c in zip(times, compiling) if c]
        arms[arm] = {"steps": len(times), "window_s": window_s,
                     "step_ms_p50": 1e3 * pct(times, 0.5), "step_ms_p99": 1e3 * pct(times, 0.99),
                     "step_ms_max": 1e3 * max(times),
                     "steps_while_compiling": len(during),
                     "step_ms_p99_while_compiling": 1e3 * pct(during, 0.99) if during else None}
        timed_steps(count=10)  # back to the background alone
    engine.abort_request([r for r in bg if r in core.requests])
    while engine.has_unfinished_requests():
        engine.step()
    engine.final_outputs_only = True
    return {"background_requests": background, "probe_requests": len(schemas),
            "background_step_ms_p50": 1e3 * pct(base, 0.5), "background_step_ms_p99": 1e3 * pct(base, 0.99),
            **{f"{arm}_{k}": v for arm, d in arms.items() for k, v in d.items()}}


def full_batch_step_ms(run_out: dict, n: int):
    """p50 wall time of the steps that ran at least 3/4 of the requests with no compile
    pending (the steady state the per-step cost is about: a p50, so the few prefill
    chunks among them do not move it), and their count."""
    xs = [s for s, c, r in zip(run_out["steps"], run_out["compiling"], run_out["running"])
          if not c and r >= 0.75 * n]
    return (None if not xs else 1e3 * pct(xs, 0.5)), len(xs)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def check_outputs(outs, schemas) -> dict:
    """How many stopped, and how many of those parse and validate."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    stopped = valid = 0
    invalid = []
    for c, schema in zip(outs, schemas):
        if c.finish_reason != "stop":
            continue
        stopped += 1
        try:
            obj = json.loads(c.text, strict=False)
            if jsonschema is not None:
                jsonschema.validate(obj, schema)
            valid += 1
        except Exception as exc:  # noqa: BLE001 - counted, not raised: a benchmark reports
            invalid.append({"text": c.text[:300], "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return {"stopped": stopped, "stopped_valid": valid, "invalid_examples": invalid[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a name under ../shared/models or a dir with config.json")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--num-requests", type=int, default=None, help="default 256 (8 with --device cpu)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 512 (160 with --device cpu)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--backend", choices=["xgrammar", "guidance"], default="xgrammar",
                   help="the grammar backend (structured_outputs_config)")
    p.add_argument("--standin-step-ms", type=float, default=None,
                   help="no model: a stand-in executor sleeps this per step (plus --standin-token-us per "
                        "scheduled token) and samples grammar rows from their bitmasks; the host path alone")
    p.add_argument("--standin-token-us", type=float, default=0.0)
    p.add_argument("--no-pipeline", action="store_true",
                   help="queue each grammar step's sampling before planning the next (the engine before "
                        "pipelining), to compare")
    p.add_argument("--grammar-threads", type=int, default=None,
                   help="threads for the matchers' per-step work (default: half the CPUs, up to 8)")
    p.add_argument("--precompiled", action="store_true",
                   help="compile every schema before the timed run (cache hits): the step loop's cost alone")
    p.add_argument("--fill-threads", type=int, default=None,
                   help="xgrammar threads for a step's bitmask fill (default: half the CPUs, up to 8)")
    p.add_argument("--late-inputs", action="store_true",
                   help="build each pipelined grammar step's inputs after the step before it has its "
                        "sampling queued, not while its bitmasks fill (the engine before this), to compare")
    p.add_argument("--trace", action="store_true",
                   help="also time each phase of the steps on the host and the device (CUDA events): "
                        "medians of the full-batch steps in the result's \"trace\"")
    p.add_argument("--probe", type=int, default=64,
                   help="after the runs, the compile probe: this many requests with schemas not yet "
                        "compiled arrive beside a steady batch of as many unconstrained ones (0: none)")
    args = p.parse_args()
    standin = args.standin_step_ms is not None
    if standin:
        args.device = "cpu"
        os.environ["RAYLM_STANDIN_STEP_MS"] = str(args.standin_step_ms)
        os.environ["RAYLM_STANDIN_TOKEN_US"] = str(args.standin_token_us)
    cpu = args.device == "cpu" and not standin
    n = args.num_requests or (8 if cpu else 256)
    max_tokens = args.max_tokens or (160 if cpu else 512)

    from raylm import LLM, SamplingParams, StructuredOutputsParams

    d = model_dir(args)
    extra = ({"distributed_executor_backend": "raylm.engine.standin_executor:StandInExecutor",
              "async_scheduling": True} if standin else {})  # as on a GPU
    llm = LLM(model=d, load_format="dummy", device=args.device,
              dtype="float32" if args.device == "cpu" else "bfloat16", max_model_len=2048,
              max_num_seqs=args.max_num_seqs, seed=0, enable_prefix_caching=False,
              structured_outputs_config={"backend": args.backend}, **extra)
    rng = random.Random(0)
    schemas = make_schemas(n, rng)
    prompts = [f"Return a JSON object describing {rng.choice(TOPICS)}. Schema: {json.dumps(s)}" for s in schemas]
    constrained = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=max_tokens,
                                  structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(schemas)]

    # Warm-up, so that neither timed run pays a first use the other does not (the structured run
    # goes first): every prompt, unconstrained, for a few tokens (the timed runs' prefill chunks and
    # full-batch decode steps: kernel variants compile on first use of a shape), then one grammar
    # (the first builds the tokenizer's tables, once per engine) on enough rows for the threaded
    # grammar step and a many-row bitmask.
    llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    warm = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    t = time.perf_counter()
    llm.generate(["warm up"], SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(json=warm)),
                 use_tqdm=False)
    setup_s = time.perf_counter() - t
    llm.generate(prompts[:min(n, 64)], SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(json=warm)),
                 use_tqdm=False)
    grammars = llm.llm_engine.core._grammars
    llm.llm_engine.core.pipeline_grammar_steps = not args.no_pipeline
    if args.late_inputs:
        llm.llm_engine.core.executor.supports_before_inputs = False
    if args.grammar_threads:
        grammars.accept_threads = args.grammar_threads
    from raylm.engine import grammar as grammar_mod

    if args.fill_threads:
        grammar_mod.FILL_THREADS = args.fill_threads
        grammars._chunk_fillers.clear()  # the warm-up's, built with the default
    grammars.compile_seconds.clear()
    if args.precompiled:  # the step loop alone: every schema already in the compile cache
        for c in constrained:
            grammars.compile(c.structured_outputs).result()

    b = run(llm, prompts, constrained, "s", trace=args.trace)
    # The same requests unconstrained, each generating as many tokens as its structured
    # output had (ignore_eos), so both runs do the same work but for the grammar.
    plain = [SamplingParams(temperature=args.temperature, seed=i, ignore_eos=True,
                            max_tokens=max(1, len(c.token_ids))) for i, c in enumerate(b["outputs"])]
    a = run(llm, prompts, plain, "u", trace=args.trace)
    probe = {}
    if args.probe:
        k = min(args.probe, n)
        # Past the run's n: each has a field note_<i> with i >= n, so none is a schema of the run
        # (make_schemas gives schema i that field), and none is compiled yet.
        fresh = make_schemas(len(schemas) + k, random.Random(1))[-k:]
        probe = compile_probe(llm, prompts[:len(fresh)], fresh, min(args.probe, args.max_num_seqs - k),
                              args.temperature)
    llm.shutdown()
    tok_a = sum(len(c.token_ids) for c in a["outputs"])
    tok_b = sum(len(c.token_ids) for c in b["outputs"])
    compile_s = list(grammars.compile_seconds)
    while_compiling = [s for s, c in zip(b["steps"], b["compiling"]) if c]
    model_name = os.path.basename(os.path.normpath(args.model))  # a folder under ../shared/models, or a path
    result = common.base_result("structured", model_name if not cpu else "tiny-llama")
    if standin:
        result["device"] = (f"stand-in executor ({args.standin_step_ms} ms + {args.standin_token_us} us per "
                            f"token a step) on {os.cpu_count()} CPUs")
    result.update({
        "num_requests": n, "max_tokens": max_tokens, "precompiled": args.precompiled,
        "pipelined": not args.no_pipeline, "early_inputs": not args.late_inputs,
        "grammar_threads": grammars.accept_threads, "fill_threads": grammar_mod.FILL_THREADS,
        "temperature": args.temperature, "backend": args.backend,
        "tokenizer": "SmolLM2-135M-Instruct (49152 tokens)",
        "unconstrained_output_tok_per_s": tok_a / a["elapsed"],
        "structured_output_tok_per_s": tok_b / b["elapsed"],
        "unconstrained_output_tokens": tok_a, "structured_output_tokens": tok_b,
        "grammar_setup_s": setup_s, "num_compiles": len(compile_s),
        "compile_ms_p50": 1e3 * pct(compile_s, 0.5), "compile_ms_p99": 1e3 * pct(compile_s, 0.99),
        "step_ms_p99_while_compiling": None if not while_compiling else 1e3 * pct(while_compiling, 0.99),
        "steps_while_compiling": len(while_compiling),
        # wall time until the last compile finished (requests wait for theirs to be scheduled)
        "structured_s_while_compiling": sum(while_compiling), "structured_s": b["elapsed"],
        "unconstrained_s": a["elapsed"],
        "structured_step_ms_p99": 1e3 * pct(b["steps"], 0.99),
        "unconstrained_step_ms_p99": 1e3 * pct(a["steps"], 0.99),
        "unconstrained_step_ms_p50": 1e3 * pct(a["steps"], 0.5),
        "structured_step_ms_p50": 1e3 * pct(b["steps"], 0.5),
        "structured_full_batch_step_ms_p50": full_batch_step_ms(b, n)[0],
        "unconstrained_full_batch_step_ms_p50": full_batch_step_ms(a, n)[0],
        "full_batch_steps": [full_batch_step_ms(b, n)[1], full_batch_step_ms(a, n)[1]],
        **check_outputs(b["outputs"], schemas),
        "structured_step_timing": b["timing"], "unconstrained_step_timing": a["timing"],
        "compile_probe": probe,
    })
    if args.trace:
        result["trace"] = {"structured": b["trace"], "unconstrained": a["trace"]}
    result["ratio_structured_vs_unconstrained"] = (result["structured_output_tok_per_s"]
                                                   / result["unconstrained_output_tok_per_s"])
    print(f"unconstrained {result['unconstrained_output_tok_per_s']:.0f} tok/s, structured "
          f"{result['structured_output_tok_per_s']:.0f} tok/s (ratio {result['ratio_structured_vs_unconstrained']:.2f}); "
          f"compile p50 {result['compile_ms_p50']:.1f} ms p99 {result['compile_ms_p99']:.1f} ms; "
          f"{result['stopped']}/{n} stopped, {result['stopped_valid']} valid; full-batch step p50 "
          f"{result['structured_full_batch_step_ms_p50'] or 0:.1f} ms vs "
          f"{result['unconstrained_full_batch_step_ms_p50'] or 0:.1f} ms", flush=True)
    if args.trace:
        for arm in ("structured", "unconstrained"):
            for side, d in result["trace"][arm].items():
                print(f"trace {arm} {side}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in d.items()), flush=True)
    if probe:
        print(f"compile probe: {probe['probe_requests']} new schemas beside {probe['background_requests']} "
              f"decoding requests (steps p50 / p99 {probe['background_step_ms_p50']:.1f} / "
              f"{probe['background_step_ms_p99']:.1f} ms): until all have a token, structured "
              f"{probe['structured_steps']} steps in {1e3 * probe['structured_window_s']:.0f} ms, p50 / p99 "
              f"{probe['structured_step_ms_p50']:.1f} / {probe['structured_step_ms_p99']:.1f} ms; the same "
              f"unconstrained {probe['unconstrained_steps']} steps in {1e3 * probe['unconstrained_window_s']:.0f} "
              f"ms, {probe['unconstrained_step_ms_p50']:.1f} / {probe['unconstrained_step_ms_p99']:.1f} ms",
              flush=True)
    if cpu and not os.environ.get("OUT"):
        print(json.dumps(result, indent=2))
        return
    suffix = (("" if args.backend == "xgrammar" else f"-{args.backend}") + ("-standin" if standin else "")
              + ("-precompiled" if args.precompiled else "") + ("-unpipelined" if args.no_pipeline else "")
              + (f"-n{n}" if args.num_requests and not cpu else "")
              + (f"-t{args.grammar_threads}" if args.grammar_threads else ""))
    common.save_result(result, f"structured_{model_name if not cpu else 'cpu-smoke'}{suffix}")


if __name__ == "__main__":
    main()
