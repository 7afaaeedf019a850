"""The host's share of a decode step: an LLMEngine whose executor is replaced by a
stand-in that returns a sampled token for every sequence at once, so each step measures
only what the engine process does (schedule, plan, record, detokenize, build outputs),
and again with the plan and the result through msgpack as the Ray path sends them
(StepPlan.to_wire / from_wire: per-step diffs, a row carries only its new block ids).

It bounds what one engine process (and the global scheduler, which runs every group's
engine in one process) can sustain: a GPU step shorter than this leaves the GPU waiting.
There is no peer: vLLM and HF transformers do not expose this slice of a step.

    .venv/bin/python benchmarks/host_step.py                 # 256 sequences, 200 steps
    .venv/bin/python benchmarks/host_step.py --batch 64 --steps 50

Writes benchmarks/results/host_step.json (or under $OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# A tiny Llama: the stand-in executor never runs it, but the engine loads it.
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "torch_dtype": "float32", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}


def measure(batch: int, steps: int, wire: str, vocab: int, seed: int = 0) -> dict:
    """wire: "none", or "whole" (the Ray path's msgpack round trip of plan and result)."""
    import msgpack
    from transformers import AutoConfig

    from raylm.engine.config import EngineArgs
    from raylm.engine.llm_engine import LLMEngine
    from raylm.engine.sampling_params import SamplingParams
    from raylm.workers.messages import StepPlan, StepResult

    d = tempfile.mkdtemp(prefix="raylm-host-step-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(TINY, vocab_size=vocab), f)
    common.add_word_tokenizer(d, AutoConfig.from_pretrained(d))
    engine = LLMEngine(EngineArgs(model=d, load_format="dummy", device="cpu", dtype="float32",
                                  max_model_len=4096, max_num_seqs=batch, async_scheduling=False))
    rng = random.Random(seed)

    def stand_in(plan):
        if wire == "whole":
            plan = StepPlan.from_wire(msgpack.unpackb(msgpack.packb(plan.to_wire())))
        result = StepResult(sampled={s.request_id: rng.randrange(3, vocab) for s in plan.seqs if s.sample})
        if wire != "none":
            result = StepResult.from_wire(msgpack.unpackb(msgpack.packb(result.to_wire())))
        return result

    engine.executor.execute = stand_in
    for i in range(batch):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(100, 1000))]
        engine.add_request(str(i), {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=steps + 100, ignore_eos=True, temperature=0.6))
    while engine.scheduler.num_waiting or engine.timing["steps"] < 20:  # past every prefill
        engine.step()
    running = engine.scheduler.num_running
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = (time.perf_counter() - t) / steps
    engine.shutdown()
    return {"batch": batch, "running": running, "wire": wire, "host_ms_per_step": 1e3 * seconds,
            "host_us_per_sequence": 1e6 * seconds / running}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=128256, help="the word tokenizer's size (Llama 3's)")
    args = p.parse_args()
    rows = [measure(args.batch, args.steps, wire, args.vocab_size) for wire in ("none", "whole")]
    for r in rows:
        print(f"{r['running']} sequences, wire {r['wire']}: {r['host_ms_per_step']:.2f} ms host per decode "
              f"step ({r['host_us_per_sequence']:.1f} us per sequence)", flush=True)
    result = common.base_result("host_step", "tiny llama, stand-in executor")
    result.update({"rows": rows, "peer": None, "peer_output_tok_per_s": None, "roofline_output_tok_per_s": None})
    common.save_result(result, "host_step")


if __name__ == "__main__":
    main()
