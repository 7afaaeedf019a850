"""Tensor parallelism on several GPUs against one: random bf16 weights (`load_format=
"dummy"` draws the same full tensors on every rank, so TP=N holds TP=1's model), greedy
decoding of random prompts at TP=1 and at each larger size, compared token by token and
by the log-probability of each chosen token, plus the start-up and shutdown time of each
size (a hang would show here).

    python benchmarks/tp_correctness.py --model llama-3.1-8b --tp-sizes 1,2,4

Writes benchmarks/results/tp_correctness-<model>.json (or under $OUT).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

TOP_K = 5
# Random weights give nearly flat logits: a divergence where the reference's top two
# tokens are within this many nats is a near-tie that bf16 rounding can flip.
NEAR_TIE_NATS = 0.1


def run(cfg_dir: str, tp: int, prompts, max_tokens: int, enforce_eager: bool, max_model_len: int) -> dict:
    from raylm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max_model_len, max_num_seqs=64, gpu_memory_utilization=0.6, seed=0,
              tensor_parallel_size=tp, enforce_eager=enforce_eager)
    startup_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_K)
    run = greedy_record(llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False))
    t = time.perf_counter()
    llm.shutdown()
    return dict(run, startup_s=startup_s, shutdown_s=time.perf_counter() - t)


def greedy_record(outs) -> dict:
    """What `compare` reads of raylm outputs sampled with logprobs=TOP_K: each prompt's
    tokens, each chosen token's logprob, and each position's top tokens."""
    comps = [o.outputs[0] for o in outs]
    return {"tokens": [c.token_ids for c in comps],
            "logprobs": [[c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)] for c in comps],
            "top": [[{t: lp.logprob for t, lp in d.items()} for d in c.logprobs] for c in comps]}


def compare(ref: dict, other: dict, first: int) -> dict:
    """How far `other` follows `ref`: prompts whose first `first` tokens agree, where each
    prompt diverges, and the largest logprob difference before it diverges."""
    diverge, max_diff, gaps = [], 0.0, []
    for a, b, la, lb, top in zip(ref["tokens"], other["tokens"], ref["logprobs"], other["logprobs"],
                                 ref["top"]):
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        diverge.append(d)
        if d < len(a):  # how far the reference ranked the other's token below its own
            gaps.append(top[d][a[d]] - top[d][b[d]] if b[d] in top[d] else None)
        # Up to and including the first differing position: the same context on both sides.
        upto = min(d + 1, len(a))
        max_diff = max([max_diff] + [abs(x - y) for x, y in zip(la[:upto], lb[:upto])])
    n = len(diverge)
    return {"prompts": n, "first_tokens_compared": first,
            "prompts_agreeing_on_first_tokens": sum(d >= first for d in diverge),
            "first_divergence": diverge, "max_abs_logprob_diff_before_divergence": max_diff,
            "divergence_gaps_nats": gaps,
            "divergences_at_near_ties": sum(g is not None and g < NEAR_TIE_NATS for g in gaps)}


def describe(c: dict) -> str:
    """One line of a `compare` result."""
    gaps = [None if g is None else round(g, 3) for g in c["divergence_gaps_nats"]]
    return (f"{c['prompts_agreeing_on_first_tokens']}/{c['prompts']} prompts agree on the first "
            f"{c['first_tokens_compared']} tokens; first divergences {c['first_divergence']}; max abs "
            f"logprob diff before divergence {c['max_abs_logprob_diff_before_divergence']:.4f}; "
            f"{c['divergences_at_near_ties']} of {len(gaps)} divergences at a near-tie "
            f"(< {NEAR_TIE_NATS} nats): gaps {gaps}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--tp-sizes", default="1,2,4")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--first", type=int, default=16, help="tokens that should agree")
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()

    from transformers import AutoConfig

    cfg_dir = common.model_dir(args.model)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    prompts, _ = common.make_workload(args.num_prompts, 16, args.max_prompt_len, cfg.vocab_size)
    sizes = [int(x) for x in args.tp_sizes.split(",")]
    runs = {tp: run(cfg_dir, tp, prompts, args.max_tokens, args.enforce_eager, args.max_model_len) for tp in sizes}
    base = runs[sizes[0]]
    result = common.base_result("tp_correctness", args.model)
    result.update({"tp_sizes": sizes, "reference_tp": sizes[0], "enforce_eager": args.enforce_eager,
                   "num_prompts": len(prompts), "max_tokens": args.max_tokens,
                   "startup_s": {str(tp): r["startup_s"] for tp, r in runs.items()},
                   "shutdown_s": {str(tp): r["shutdown_s"] for tp, r in runs.items()},
                   "vs_reference": {str(tp): compare(base, r, args.first) for tp, r in runs.items()
                                    if tp != sizes[0]},
                   # The summary fields every result file carries (no throughput here).
                   "raylm_output_tok_per_s": None, "peer": f"raylm TP={sizes[0]}",
                   "peer_output_tok_per_s": None, "roofline_output_tok_per_s": None})
    for tp, c in result["vs_reference"].items():
        print(f"TP={tp} vs TP={sizes[0]}: {describe(c)}", flush=True)
    common.save_result(result, f"tp_correctness-{os.path.basename(args.model.rstrip('/'))}" + ("-eager" if args.enforce_eager else ""))


if __name__ == "__main__":
    main()
