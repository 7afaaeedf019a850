"""Where the time of one decode step goes at batch 256: host work (scheduling, input
preparation, sampling bookkeeping, output processing) against GPU time (the captured
forward pass, the LM head, sampling kernels), measured with CUDA events and wall clocks.

    python benchmarks/step_profile.py --model qwen3-0.6b --batch 256 --context 1024
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.6)
    args = p.parse_args()

    from raylm import LLM, SamplingParams
    from raylm.workers import sampler

    cfg_dir = common.model_dir(args.model)
    llm = LLM(cfg_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, max_num_seqs=args.batch, gpu_memory_utilization=0.8)
    engine = llm.llm_engine
    runner = engine.executor.runner
    vocab = engine.vocab_size
    for i in range(args.batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [(i * 31 + j) % vocab for j in range(args.context)]},
                           SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=args.temperature))
    while engine.scheduler.num_waiting or any(r.is_prefilling for r in engine.scheduler.running):
        engine.step()  # prefill everything first
    for _ in range(5):
        engine.step()

    # Wall-clock split of the synchronous step loop.
    engine.reset_timing()
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = (time.perf_counter() - t) / args.steps
    loop = engine.timing_summary()

    # GPU time of the pieces, with CUDA events around each (inputs of a real step).
    sched_out = engine.scheduler.schedule()
    plan = engine.core.planner.plan(sched_out)
    runner._update_states(plan)
    seqs = plan.seqs
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(8)]
    gpu = {"forward_graph_ms": [], "lm_head_ms": [], "sample_ms": []}
    host = {"graph_inputs_ms": [], "sample_host_ms": []}
    states = [runner.states[s.request_id] for s in seqs]
    for _ in range(args.steps):
        torch.cuda.synchronize()
        h0 = time.perf_counter()
        hidden, _ = runner._forward(plan)  # input copy + replay (async)
        h1 = time.perf_counter()
        ev[0].record()
        torch.cuda.synchronize()
        ev[1].record()
        ev[2].record()
        logits = runner.model.compute_logits(hidden).float()
        ev[3].record()
        h2 = time.perf_counter()
        tokens = sampler.sample(logits, states, runner.default_generator)
        h3 = time.perf_counter()
        ev[4].record()
        tokens.tolist()
        torch.cuda.synchronize()
        gpu["lm_head_ms"].append(ev[2].elapsed_time(ev[3]))
        gpu["sample_ms"].append(ev[3].elapsed_time(ev[4]))
        host["graph_inputs_ms"].append(1e3 * (h1 - h0))
        host["sample_host_ms"].append(1e3 * (h3 - h2))
    b = next(s for s in runner.graphs.sizes if s >= len(seqs))
    for _ in range(args.steps):
        ev[5].record()
        runner.graphs.graphs[b].replay()
        ev[6].record()
        torch.cuda.synchronize()
        gpu["forward_graph_ms"].append(ev[5].elapsed_time(ev[6]))
    engine.scheduler.update_after_step(sched_out)  # keep the scheduler consistent

    nums = common.model_numbers(__import__("transformers").AutoConfig.from_pretrained(cfg_dir))
    bw = common.measure_bandwidth()
    ctx = sum(s.start_pos + 1 for s in seqs)
    floor_ms = 1e3 * (nums["weight_bytes"] + ctx * nums["kv_bytes_per_token"]) / bw
    res = common.base_result("step_profile", args.model)
    res.update({"batch": len(seqs), "mean_context": ctx / len(seqs), "wall_ms_per_step": 1e3 * wall,
                "loop": loop, "bandwidth_floor_ms": floor_ms,
                **{k: statistics.median(v) for k, v in gpu.items()},
                **{k: statistics.median(v) for k, v in host.items()}})
    llm.shutdown()
    common.save_result(res, f"step_profile-{args.model}")


if __name__ == "__main__":
    main()
