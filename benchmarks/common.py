"""Shared pieces of the GPU benchmarks: the workload, measured hardware ceilings, the
roofline, the HF transformers peer on the same weights, and result files."""
from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copies of ../shared/models/*/config.json, so the benchmarks run from a checkout alone.
MODELS = os.path.join(ROOT, "benchmarks", "models")
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc), imports included."""
    from raylm.cluster.startup import process_start_epoch

    return time.time() - process_start_epoch()


def model_dir(name: str) -> str:
    """A directory holding config.json: a name under ../shared/models or a path. Copied to
    a temp dir so nothing is written next to the shared configs."""
    src = name if os.path.isdir(name) else os.path.join(MODELS, name)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise SystemExit(f"--model {name!r}: no config.json in {src}")
    dst = tempfile.mkdtemp(prefix="raylm-bench-")
    shutil.copy(os.path.join(src, "config.json"), dst)
    return dst


def add_word_tokenizer(cfg_dir: str, cfg) -> None:
    """Save a tokenizer into `cfg_dir` that maps id i to the word "t<i>", so every id of
    the vocabulary decodes and a server can run a random-weight model whose real tokenizer
    is not here (prompts are sent as token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def word(token_id):
        if isinstance(token_id, (list, tuple)):
            token_id = token_id[0] if token_id else None
        return None if token_id is None else f"t{token_id}"

    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token=word(cfg.bos_token_id),
                            eos_token=word(cfg.eos_token_id)).save_pretrained(cfg_dir)


def add_workload_args(p) -> None:
    """The workload and engine-size flags the throughput and serving benchmarks share,
    with nano-vllm's workload as the default."""
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def make_workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    """nano-vllm's benchmark: n requests, prompt and output lengths uniform in [lo, hi],
    random token ids."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outputs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outputs


def measure_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus written)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * iters / (time.perf_counter() - t)


def measure_matmul_peak(n: int = 8192, iters: int = 20) -> float:
    """bf16 matmul FLOP/s on n x n x n."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def model_numbers(cfg) -> dict:
    """Weight bytes read per step (bf16) and KV bytes per token."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    embed = cfg.vocab_size * h
    lm_head = embed  # read every step whether tied or not
    params_matmul = L * per_layer + lm_head
    return {"weight_bytes": 2 * params_matmul, "params_matmul": params_matmul,
            "kv_bytes_per_token": 2 * L * kv * 2, "layers": L, "q_dim": q}


def throughput_roofline(prompts, outputs, nums: dict, bandwidth: float, peak: float) -> dict:
    """Lower bound on the time of the workload with every request in one batch: each decode
    step reads the weights once plus the KV of every active sequence; the prefill costs
    2 * params * prompt tokens (plus attention) FLOPs at the matmul peak."""
    kv_tok = nums["kv_bytes_per_token"]
    steps = max(outputs)
    decode_s = 0.0
    for s in range(steps):
        ctx = sum(len(p) + s for p, o in zip(prompts, outputs) if o > s)
        decode_s += (nums["weight_bytes"] + ctx * kv_tok) / bandwidth
    prompt_tokens = sum(len(p) for p in prompts)
    attn = sum(2 * 2 * nums["layers"] * nums["q_dim"] * len(p) * len(p) / 2 for p in prompts)
    prefill_s = (2 * nums["params_matmul"] * prompt_tokens + attn) / peak
    total = sum(outputs)
    return {"roofline_s": decode_s + prefill_s, "roofline_output_tok_per_s": total / (decode_s + prefill_s),
            "roofline_decode_s": decode_s, "roofline_prefill_s": prefill_s}


def hf_model_on_gpu(cfg, dtype=torch.bfloat16):
    """transformers' model with random weights, created on the GPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@torch.inference_mode()
def hf_generate_throughput(model, prompts, outputs, batch_size: int, temperature: float) -> dict:
    """HF generate, batched: requests sorted by length, left-padded, each batch run to its
    longest output with EOS ignored; only the tokens each request asked for are counted."""
    order = sorted(range(len(prompts)), key=lambda i: (outputs[i], len(prompts[i])))
    pad = 0
    t = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], device="cuda")
            mask[row, width - len(prompts[i]):] = 1
        new = max(outputs[i] for i in idx)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=temperature > 0, temperature=temperature or None, top_p=None,
                       top_k=None, pad_token_id=pad)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    return {"peer_time_s": elapsed, "peer_output_tok_per_s": sum(outputs) / elapsed,
            "peer_batch_size": batch_size}


def copy_weights_into_raylm(llm, hf_model) -> None:
    """Load the HF model's tensors into raylm's in-process runner: the same weights."""
    runner = llm.llm_engine.executor.runner
    runner.model.load_weights(iter(hf_model.state_dict().items()))


def save_result(result: dict, stem: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out_dir = os.environ.get("OUT")
    path = os.path.join(out_dir or RESULTS_DIR, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return path


def device_name() -> str:
    """The GPU's name (a record's "device"), or "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def http_stack() -> dict:
    """What the ingress replicas serve HTTP with in this environment (they share its
    packages): uvicorn's parser (httptools, or the pure-Python h11 without it) and the
    event loop (uvloop, which Ray uses where installed unless RAY_USE_UVLOOP=0, or
    asyncio's own). A user's `pip install raylm` brings both C parts, through
    ray[serve]'s uvicorn[standard]."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    def have(name: str) -> Optional[str]:
        try:
            return version(name) if find_spec(name) is not None else None
        except PackageNotFoundError:
            return None

    uvloop_on = os.environ.get("RAY_USE_UVLOOP", "1").lower() not in ("0", "false", "no", "off")
    parser, loop = have("httptools"), have("uvloop") if uvloop_on else None
    return {"http_parser": f"httptools {parser}" if parser else "h11 (pure Python)",
            "event_loop": f"uvloop {loop}" if loop else "asyncio"}


def base_result(benchmark: str, model: str) -> dict:
    return {"benchmark": benchmark, "model": model, "device": device_name(),
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "torch": torch.__version__}


def cuda_time_us(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean microseconds of fn() on the GPU (CUDA events around `iters` calls after
    `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3
