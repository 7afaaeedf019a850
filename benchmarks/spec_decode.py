"""N-gram speculative decoding against plain decoding, in one run on the same random
weights: batch-1 TPOT and output tok/s at a fixed k, and output tok/s of a large batch
with adaptive k (proposals stop above disable_by_batch_size running requests).

    python benchmarks/spec_decode.py --model llama-3.1-8b
    python benchmarks/spec_decode.py --model qwen3-8b --batch-size 256 --disable-by-batch-size 64
    python benchmarks/spec_decode.py --smoke      # CPU, a tiny llama; writes only under $OUT
    python benchmarks/spec_decode.py --model qwen3-8b --method draft_model --draft-model qwen3-0.6b
    python benchmarks/spec_decode.py --smoke --method draft_model
    python benchmarks/spec_decode.py --model smollm2-135m-instruct --workloads edit --batch-size 16

With `--method draft_model` it measures what one propose-and-verify round costs: the
time of a step that verifies k proposals per row and drafts the next k with the draft
model, in steps of plain decoding, at batch 1, 16 and 64 (`--draft-batch-sizes`). With
random weights nothing is accepted, so each step emits one token per row; a real draft
pays off when its mean acceptance length (tokens per row per round) exceeds that cost.

Workloads (greedy), so that acceptance can be measured and varied:
- `repeat`: random prompts; random-weight greedy decoding falls into repeating cycles
  that prompt lookup finds (how soon depends on the model: acceptance is measured).
- `copy`: each prompt is P + G + P, G the target's own greedy continuation of P (from
  the plain engine), so the continuation after the second P tends to repeat G.
- `cycle`: each prompt is P + W, W the target's own greedy continuation of P over
  `--warm-len` tokens (from the plain engine): the prompt ends where the plain greedy
  trajectory has run long enough to fall into its cycle, if it has one, so the requests
  continue a trajectory that repeats the prompt's tail.
- `lookup` (the high-acceptance workload): candidates four times the batch, each a
  random motif of 1-16 tokens repeated to `--prompt-len`; the plain engine continues
  each greedily, a replay of the n-gram proposer over that continuation says how much
  of it prompt lookup predicts (`predicted_acceptance_rate`), and the batch keeps the
  best-predicted candidates, best first. The run then measures what it accepts.
- `edit` (`--model smollm2-135m-instruct`, the real embedded model and its chat template,
  on the GPU if there is one, else the CPU in float32): "repeat / rewrite this text"
  requests over a few paragraphs of prose and code; each ends where the model ends it.
Each record also says how many requests gave the same tokens as plain decoding (bf16
near-ties may differ between one position at a time and k + 1 at once).
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


# The real embedded model (its GGUF weights and tokenizer), for the "edit" workload.
SMOLLM2 = "smollm2-135m-instruct"

# Texts for the "edit" workload: the model is asked to repeat or correct them.
EDIT_TEXTS = [
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
    "the members agreed to increase funding for the public library by ten percent, to repair the roof of "
    "the community centre before winter, and to hire two more staff for the parks department. The vote "
    "was unanimous, and the new budget will take effect on the first of January.",
    "To make a simple bread, mix five hundred grams of flour with a teaspoon of salt and a packet of dry "
    "yeast. Add three hundred millilitres of warm water and knead the dough for ten minutes, until it is "
    "smooth. Leave it covered in a warm place for an hour, shape it into a loaf, let it rise again for "
    "thirty minutes, and bake it at two hundred degrees for about thirty five minutes.",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n"
    "            result.append(b[j])\n            j += 1\n    result.extend(a[i:])\n    result.extend(b[j:])\n"
    "    return result\n",
    "Dear Maria, thank you for your letter and for the photographs of the garden. The roses look "
    "wonderful this year, and I am glad the apple tree survived the storm. We are planning to visit in "
    "August, if that suits you, and we would love to stay for a week. Please let me know which dates are "
    "best for you. With love, Anna.",
]
EDIT_ASKS = ["Repeat the following text exactly, without any comment:\n\n{}",
             "Rewrite the following text with the same words, changing nothing:\n\n{}"]


def edit_prompts(llm, n: int) -> list[list[int]]:
    """Chat prompts (the model's template) asking to repeat or rewrite a text unchanged."""
    tok = llm.get_tokenizer()
    out = []
    for i in range(n):
        text = EDIT_TEXTS[i % len(EDIT_TEXTS)]
        ask = EDIT_ASKS[(i // len(EDIT_TEXTS)) % len(EDIT_ASKS)].format(text)
        text = tok.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True,
                                       tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def engine_kwargs(args, cfg_dir: str, max_num_seqs: int) -> dict:
    if args.model == SMOLLM2:  # the real weights and tokenizer (LLM(None) loads them)
        kw = dict(model=None, seed=0, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                  enable_prefix_caching=False)
        return dict(kw, dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization) \
            if torch.cuda.is_available() else dict(kw, dtype="float32", device="cpu")
    kw = dict(model=cfg_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=args.max_model_len, max_num_seqs=max_num_seqs, enable_prefix_caching=False)
    if args.smoke:
        return dict(kw, dtype="float32", device="cpu")
    return dict(kw, dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)


def ngram(k: int, adaptive: bool = False, disable_by_batch_size=None) -> dict:
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    if adaptive:
        spec["adaptive_num_speculative_tokens"] = True
    if disable_by_batch_size is not None:
        spec["disable_by_batch_size"] = disable_by_batch_size
    return spec


def sync(llm) -> None:
    if llm.llm_engine.device.startswith("cuda"):
        torch.cuda.synchronize()


def batch1(llm, prompts, out_len: int, ignore_eos: bool = True) -> dict:
    """Each prompt alone: median TPOT (first token to last, per token) and the outputs."""
    from raylm import SamplingParams

    engine = llm.llm_engine
    tpots, outputs = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b1-{i}", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=out_len, ignore_eos=ignore_eos, temperature=0))
        sync(llm)
        first, tokens = None, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None:
                    first = time.perf_counter()
                if out.finished:
                    tokens = out.outputs[0].token_ids
        sync(llm)
        tpots.append((time.perf_counter() - first) / max(1, len(tokens) - 1))
        outputs.append(tokens)
    tpot = statistics.median(tpots)
    return {"tpot_ms": 1e3 * tpot, "output_tok_per_s": 1.0 / tpot, "outputs": outputs}


def batched(llm, prompts, out_len: int, ignore_eos: bool = True) -> dict:
    """All prompts at once: output tok/s and the outputs."""
    from raylm import SamplingParams

    sp = SamplingParams(max_tokens=out_len, ignore_eos=ignore_eos, temperature=0)
    sync(llm)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    sync(llm)
    elapsed = time.perf_counter() - t
    tokens = [o.outputs[0].token_ids for o in outs]
    return {"output_tok_per_s": sum(map(len, tokens)) / elapsed, "elapsed_s": elapsed, "outputs": tokens}


def batched_best(llm, prompts, out_len: int, ignore_eos: bool = True, runs: int = 2) -> dict:
    """`batched` after a short warm-up pass over the same prompts (first-use allocations
    of the batch's shapes), best of `runs`: each engine, with speculation or without,
    is measured the same way. `runs_output_tok_per_s` keeps every run's figure."""
    batched(llm, prompts, min(out_len, 8), ignore_eos)
    results = [batched(llm, prompts, out_len, ignore_eos) for _ in range(runs)]
    best = max(results, key=lambda r: r["output_tok_per_s"])
    return dict(best, runs_output_tok_per_s=[r["output_tok_per_s"] for r in results])


def acceptance(before: dict, after: dict) -> dict:
    drafts = after["spec_decode_num_draft_tokens"] - before.get("spec_decode_num_draft_tokens", 0)
    acc = after["spec_decode_num_accepted_tokens"] - before.get("spec_decode_num_accepted_tokens", 0)
    rows = after["spec_decode_num_drafts"] - before.get("spec_decode_num_drafts", 0)
    return {"acceptance_rate": acc / drafts if drafts else 0.0, "num_draft_tokens": drafts,
            "num_accepted_tokens": acc, "num_drafts": rows,
            "mean_acceptance_length": 1.0 + acc / rows if rows else None}


def measured(llm, fn, *a) -> dict:
    before = dict(llm.stats())
    out = fn(llm, *a)
    out.update(acceptance(before, llm.stats()))
    return out


def replayed_acceptance(prompt: list[int], out: list[int], k: int, nmin: int = 2, nmax: int = 4) -> tuple:
    """(accepted, proposed) of n-gram speculation at k replayed over a known greedy
    continuation `out` of `prompt`: each round proposes from the tokens so far and
    accepts the proposals that match `out`, then emits one more token."""
    from raylm.engine.spec_decode.ngram import NgramProposer

    proposer = NgramProposer(k, nmin, nmax)
    accepted = proposed = t = 0
    while t < len(out) - 1:
        props = proposer.propose(["r"], [prompt + out[:t]], [min(k, len(out) - t - 1)])[0]
        a = 0
        while a < len(props) and props[a] == out[t + a]:
            a += 1
        accepted, proposed, t = accepted + a, proposed + len(props), t + a + 1
    return accepted, proposed


def lookup_prompts(llm, n: int, prompt_len: int, out_len: int, vocab: int, rng, k: int) -> tuple:
    """The `lookup` workload: of 4n repeated-motif prompts, the n whose plain greedy
    continuation the n-gram proposer predicts best (replayed), best first; and the
    predicted acceptance rate of those n."""
    cands = []
    for _ in range(4 * n):
        motif = [rng.randrange(vocab) for _ in range(rng.randint(1, 16))]
        cands.append((motif * (prompt_len // len(motif) + 1))[:prompt_len])
    outs = batched(llm, cands, out_len)["outputs"]
    scored = []
    for p, o in zip(cands, outs):
        acc, prop = replayed_acceptance(p, list(o), k)
        scored.append((acc / prop if prop else 0.0, acc, prop, p))
    scored.sort(key=lambda x: -x[0])
    best = scored[:n]
    acc, prop = sum(x[1] for x in best), sum(x[2] for x in best)
    return [x[3] for x in best], (acc / prop if prop else 0.0)


def make_prompts(llm, workload: str, n: int, prompt_len: int, out_len: int, vocab: int, seed: int,
                 warm_len: int = 768):
    if workload == "edit":
        return edit_prompts(llm, n)
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]
    if workload == "repeat":
        return prompts
    if workload == "cycle":  # W: the target's own greedy trajectory, long enough to cycle
        warm = batched(llm, prompts, warm_len)["outputs"]
        return [p + w for p, w in zip(prompts, warm)]
    gen = batched(llm, prompts, out_len)["outputs"]  # G: the target's own continuation
    return [p + g + p for p, g in zip(prompts, gen)]


def open_llm(kwargs: dict, spec=None):
    """An engine, warmed up (first steps, allocator, graphs) outside the measurement."""
    from raylm import LLM, SamplingParams

    llm = LLM(**kwargs, speculative_config=spec)
    warm = [[(7 * i + j) % 100 + 3 for j in range(32)] for i in range(4)]
    llm.generate([{"prompt_token_ids": p} for p in warm], SamplingParams(max_tokens=16, ignore_eos=True),
                 use_tqdm=False)
    return llm


def close(llm) -> None:
    llm.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def same(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


def run_workload(args, cfg_dir: str, vocab: int, workload: str) -> list[dict]:
    B = args.batch_size
    base = open_llm(engine_kwargs(args, cfg_dir, B))
    predicted = None
    if workload == "lookup":
        prompts, predicted = lookup_prompts(base, B, args.prompt_len, args.output_len, vocab,
                                            random.Random(1), args.k)
    else:
        prompts = make_prompts(base, workload, B, args.prompt_len, args.output_len, vocab, seed=1,
                               warm_len=args.warm_len)
    one = prompts[:args.batch1_requests]
    ignore_eos = workload != "edit"  # an edit ends where the model ends it
    base1 = batch1(base, one, args.output_len, ignore_eos)
    baseB = batched_best(base, prompts, args.output_len, ignore_eos) if B > 1 else None
    close(base)

    spec = open_llm(engine_kwargs(args, cfg_dir, B), ngram(args.k))
    spec1 = measured(spec, batch1, one, args.output_len, ignore_eos)
    close(spec)
    specB = None
    if baseB is not None:
        adaptive = open_llm(engine_kwargs(args, cfg_dir, B),
                            ngram(args.k, adaptive=True, disable_by_batch_size=args.disable_by_batch_size))
        specB = measured(adaptive, batched_best, prompts, args.output_len, ignore_eos)
        close(adaptive)

    records = []
    runs = [(1, spec1, base1, f"k={args.k}")] + ([(B, specB, baseB, "adaptive k")] if specB else [])
    for bs, ours, theirs, mode in runs:
        r = common.base_result("spec_decode", args.model)
        r.update({
            "method": "ngram", "num_speculative_tokens": args.k, "batch_size": int(bs),
            "workload": workload, "mode": mode,
            "adaptive_num_speculative_tokens": mode == "adaptive k",
            "disable_by_batch_size": args.disable_by_batch_size if mode == "adaptive k" else None,
            "prompt_len": len(prompts[0]), "output_len": args.output_len, "ignore_eos": ignore_eos,
            "mean_output_tokens": statistics.mean(map(len, ours["outputs"])),
            "raylm_tpot_ms": ours.get("tpot_ms"), "baseline_tpot_ms": theirs.get("tpot_ms"),
            **({"predicted_acceptance_rate": predicted} if predicted is not None else {}),
            **compared(ours, theirs),
        })
        print({k: v for k, v in r.items() if k not in ("command", "torch")}, flush=True)
        records.append(r)
    return records


def compared(ours: dict, base: dict) -> dict:
    """A record's fields for a run with speculation (`ours`) beside one without (`base`):
    acceptance, output tok/s of both, the speed-up and whether the outputs agree."""
    return {
        "acceptance_rate": ours["acceptance_rate"], "mean_acceptance_length": ours["mean_acceptance_length"],
        "num_draft_tokens": ours["num_draft_tokens"], "num_accepted_tokens": ours["num_accepted_tokens"],
        "raylm_output_tok_per_s": ours["output_tok_per_s"], "baseline_output_tok_per_s": base["output_tok_per_s"],
        "speedup": ours["output_tok_per_s"] / base["output_tok_per_s"],
        "requests_equal_to_baseline": same(ours["outputs"], base["outputs"]), "requests": len(ours["outputs"]),
        # record.py's generic row: the baseline stands as the peer.
        "peer": "raylm without speculation", "peer_output_tok_per_s": base["output_tok_per_s"],
        **({"raylm_runs_output_tok_per_s": ours["runs_output_tok_per_s"],
            "baseline_runs_output_tok_per_s": base["runs_output_tok_per_s"]}
           if "runs_output_tok_per_s" in ours and "runs_output_tok_per_s" in base else {}),
    }


def step_time(llm, prompts, out_len: int) -> dict:
    """All prompts at once: seconds per engine step, steps, output tok/s, acceptance."""
    before = dict(llm.stats())
    out = batched(llm, prompts, out_len)
    steps = llm.stats()["num_steps"] - before["num_steps"]
    out.update(steps=steps, step_ms=1e3 * out["elapsed_s"] / steps)
    if "spec_decode_num_drafts" in before:
        out.update(acceptance(before, llm.stats()))
    return out


def run_draft(args, cfg_dir: str, draft_dir: str, vocab: int) -> list[dict]:
    """The cost of one draft-model propose-and-verify round, in plain decode steps."""
    spec = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": args.k}
    records = []
    for bs in (int(b) for b in args.draft_batch_sizes.split(",")):
        rng = random.Random(bs)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(bs)]
        plain = open_llm(engine_kwargs(args, cfg_dir, bs))
        base = step_time(plain, prompts, args.output_len)
        close(plain)
        drafting = open_llm(engine_kwargs(args, cfg_dir, bs), spec)
        ours = step_time(drafting, prompts, args.output_len)
        close(drafting)
        r = common.base_result("spec_decode", args.model)
        r.update({
            "method": "draft_model", "draft_model": args.draft_model, "num_speculative_tokens": args.k,
            "batch_size": bs, "workload": "random", "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "baseline_step_ms": base["step_ms"], "raylm_step_ms": ours["step_ms"],
            # One round (verify k + 1 positions per row, draft k) in plain decode steps: the
            # mean acceptance length a draft needs to break even.
            "round_cost_in_decode_steps": ours["step_ms"] / base["step_ms"],
            **compared(ours, base),
        })
        print({k: v for k, v in r.items() if k not in ("command", "torch")}, flush=True)
        records.append(r)
    return records


def controlled_checkpoints(cfg_dir: str, root: str, draft_layers: int, noises: list[float], dtype,
                           device: str) -> tuple[str, dict[float, str]]:
    """The acceptance-controlled draft-model workload's weights, written as safetensors
    under `root`: (target dir, {noise: draft dir}).

    The target is `cfg_dir`'s model on raylm's dummy weights (each tensor drawn from the
    seed and its name) with every layer from `draft_layers` on silenced: its attention
    output and MLP down projections are zero, so the layer still runs, at full cost, and
    adds nothing to the residual stream; the target computes what its first `draft_layers`
    layers compute. Each draft is those layers with the embeddings, the final norm and the
    LM head, the head plus Gaussian noise of `noise` times the weights' standard deviation
    (seeded): at noise 0 the draft proposes the target's own greedy tokens (bf16 rounding
    aside), and acceptance falls as the noise grows. Acceptance is measured, not assumed."""
    import json
    import re

    from safetensors.torch import save_file
    from transformers import AutoConfig

    from raylm.workers.loader import dummy_checkpoint

    cfg = AutoConfig.from_pretrained(cfg_dir)
    if not 0 < draft_layers < cfg.num_hidden_layers:
        raise SystemExit(f"--draft-layers must be in 1..{cfg.num_hidden_layers - 1}, got {draft_layers}")
    target_dir = os.path.join(root, "target")
    cfg.save_pretrained(target_dir)
    draft_cfg = AutoConfig.from_pretrained(cfg_dir)
    draft_cfg.num_hidden_layers = draft_layers
    if getattr(draft_cfg, "layer_types", None):
        draft_cfg.layer_types = draft_cfg.layer_types[:draft_layers]
    if hasattr(draft_cfg, "max_window_layers"):
        draft_cfg.max_window_layers = min(draft_cfg.max_window_layers, draft_layers)
    drafts = {noise: os.path.join(root, f"draft-noise-{noise:g}") for noise in noises}
    draft_tensors: dict[str, torch.Tensor] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards, std = 0, 0, 0.04 / 12 ** 0.5  # uniform(-0.02, 0.02)
    for name, t in dummy_checkpoint(cfg, dtype, device, seed=0):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer >= draft_layers and name.endswith(("o_proj.weight", "down_proj.weight")):
            t.zero_()
        if layer is None or layer < draft_layers:
            draft_tensors[name] = t.cpu()
        shard[name] = t.cpu()
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= 2 << 30:
            save_file(shard, os.path.join(target_dir, f"model-{shards:05d}.safetensors"))
            shard, shard_bytes, shards = {}, 0, shards + 1
    if shard:
        save_file(shard, os.path.join(target_dir, f"model-{shards:05d}.safetensors"))
    head = "lm_head.weight" if "lm_head.weight" in draft_tensors else "model.embed_tokens.weight"
    for noise, d in drafts.items():
        draft_cfg.save_pretrained(d)
        tensors = dict(draft_tensors)
        if noise:
            w = tensors[head].float()
            gen = torch.Generator().manual_seed(int(noise * 1000))
            tensors[head] = (w + noise * std * torch.randn(w.shape, generator=gen)).to(dtype)
            if head == "model.embed_tokens.weight":  # tied: the head is the embedding
                cfg_d = json.load(open(os.path.join(d, "config.json")))
                assert cfg_d.get("tie_word_embeddings", False)
        save_file(tensors, os.path.join(d, "model.safetensors"))
    return target_dir, drafts


def run_draft_controlled(args, cfg_dir: str, vocab: int) -> list[dict]:
    """Draft-model speculation on the acceptance-controlled workload (see
    controlled_checkpoints), beside the same target without speculation, at each noise
    level and batch size: measured acceptance and speed-up."""
    import shutil

    dtype = torch.float32 if args.smoke else torch.bfloat16
    device = "cpu" if args.smoke else "cuda"
    noises = [float(x) for x in args.draft_noise.split(",")]
    batches = [int(b) for b in args.draft_batch_sizes.split(",")]
    root = tempfile.mkdtemp(prefix="raylm-controlled-")
    records = []
    try:
        t = time.perf_counter()
        target_dir, drafts = controlled_checkpoints(cfg_dir, root, args.draft_layers, noises, dtype, device)
        print(f"controlled checkpoints written in {time.perf_counter() - t:.0f} s", flush=True)
        kw = dict(engine_kwargs(args, target_dir, max(batches)), load_format="auto")
        prompts = {}
        for bs in batches:
            rng = random.Random(bs)
            prompts[bs] = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(bs)]
        plain = open_llm(kw)
        base = {bs: step_time(plain, prompts[bs], args.output_len) for bs in batches}
        close(plain)
        for noise, draft_dir in drafts.items():
            spec = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": args.k}
            drafting = open_llm(kw, spec)
            for bs in batches:
                ours = step_time(drafting, prompts[bs], args.output_len)
                r = common.base_result("spec_decode", args.model)
                r.update({
                    "method": "draft_model",
                    "draft_model": f"{args.model}'s first {args.draft_layers} layers, head noise {noise:g}",
                    "draft_layers": args.draft_layers, "draft_noise": noise,
                    "num_speculative_tokens": args.k, "mode": f"k={args.k}, noise {noise:g}",
                    "batch_size": bs, "workload": "controlled", "prompt_len": args.prompt_len,
                    "output_len": args.output_len,
                    "baseline_step_ms": base[bs]["step_ms"], "raylm_step_ms": ours["step_ms"],
                    "baseline_tpot_ms": base[bs]["step_ms"],
                    **compared(ours, base[bs]),
                    "note": (f"acceptance-controlled workload: the target silences its layers from "
                             f"{args.draft_layers} on (zero output projections, full cost), the draft is its first "
                             f"{args.draft_layers} layers with the LM head plus noise {noise:g}x the weights' "
                             f"std; greedy"),
                })
                print({k: v for k, v in r.items() if k not in ("command", "torch", "note")}, flush=True)
                records.append(r)
            close(drafting)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return records


def tiny_model_dir(layers: int = 2, hidden: int = 64) -> tuple[str, int]:
    from transformers import LlamaConfig

    d = tempfile.mkdtemp(prefix="raylm-bench-")
    LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"]).save_pretrained(d)
    return d, 320


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="a name under ../shared/models or a dir with config.json")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny llama, small sizes; writes only under $OUT")
    p.add_argument("--method", default="ngram", choices=("ngram", "draft_model"))
    p.add_argument("--draft-model", default="qwen3-0.6b",
                   help="--method draft_model: a name under ../shared/models or a dir (random weights)")
    p.add_argument("--draft-batch-sizes", default="1,16,64", help="--method draft_model: batch sizes")
    p.add_argument("--draft-workload", default="random", choices=("random", "controlled"),
                   help="--method draft_model: random (round cost of --draft-model) or controlled "
                        "(acceptance varied by --draft-noise, see controlled_checkpoints)")
    p.add_argument("--draft-layers", type=int, default=2, help="controlled: the target layers the draft keeps")
    p.add_argument("--draft-noise", default="0,0.1,0.25,0.5", help="controlled: noise levels of the draft's LM head")
    p.add_argument("--workloads", default="repeat,copy,cycle,lookup")
    p.add_argument("--warm-len", type=int, default=768,
                   help="cycle workload: tokens of the plain greedy trajectory in each prompt")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batch1-requests", type=int, default=4, help="prompts timed one at a time")
    p.add_argument("--disable-by-batch-size", type=int, default=None,
                   help="no proposals above this many running requests (default: adaptive k's own)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    args = p.parse_args()
    if args.smoke:
        args.batch_size, args.batch1_requests = min(args.batch_size, 4), min(args.batch1_requests, 2)
        args.prompt_len, args.output_len = min(args.prompt_len, 16), min(args.output_len, 24)
        args.max_model_len = min(args.max_model_len, 256)
        args.warm_len = min(args.warm_len, 64)
        cfg_dir, vocab = tiny_model_dir()
        draft_dir = tiny_model_dir(layers=1, hidden=32)[0]
        args.model, args.draft_model = "tiny-llama", "tiny-llama-1-layer"
        args.draft_batch_sizes = "1,4"
    elif args.model == SMOLLM2:  # the real model: on the GPU if there is one, else the CPU
        if args.method != "ngram":
            raise SystemExit(f"--model {SMOLLM2} runs --method ngram only (it has no draft model)")
        cfg_dir, vocab = None, None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --smoke for the CPU check")
        from transformers import AutoConfig

        cfg_dir = common.model_dir(args.model)
        vocab = AutoConfig.from_pretrained(cfg_dir).vocab_size
        draft_dir = common.model_dir(args.draft_model) if args.method == "draft_model" else None
    if args.method == "draft_model":
        controlled = args.draft_workload == "controlled"
        if controlled and args.smoke:
            args.draft_layers = 1
        records = (run_draft_controlled(args, cfg_dir, vocab) if controlled
                   else run_draft(args, cfg_dir, draft_dir, vocab))
        if args.smoke and not os.environ.get("OUT"):
            return
        common.save_result(records, f"spec_decode-draft-{args.model}" + ("-controlled" if controlled else "")
                           + ("-smoke" if args.smoke else ""))
        return
    records = []
    for workload in args.workloads.split(","):
        if workload not in ("repeat", "copy", "cycle", "lookup", "edit") or (workload == "edit") != (args.model == SMOLLM2):
            raise SystemExit(f"--workloads: workload {workload!r} does not fit --model {args.model}; "
                             f"random weights: repeat, copy, cycle, lookup; {SMOLLM2}: edit")
        records += run_workload(args, cfg_dir, vocab, workload)
    if args.smoke and not os.environ.get("OUT"):
        return  # a smoke run leaves benchmarks/results/ alone
    on_cpu = not args.smoke and not torch.cuda.is_available()
    common.save_result(records, f"spec_decode-{args.model}" + ("-smoke" if args.smoke else "")
                       + ("-cpu" if on_cpu else ""))


if __name__ == "__main__":
    main()
