#!/usr/bin/env python3
"""Regenerate the tiny quantized checkpoints under tests/quant/ckpt/ with the REAL tools.

Run each step with the python of that tool's own venv (see tests/quant/README.md):

    python make_checkpoints.py base                      # tiny float32 Llama + its reference
    python make_checkpoints.py quantize  <format> [...]  # quantize base with the format's tool
    python make_checkpoints.py reference <format> [...]  # next-token log-probs via the tool's loader
    python make_checkpoints.py list                      # formats known to this script

Everything is CPU-only and offline.  The base model is built once and committed
(ckpt/base-fp32) so every tool quantizes the very same weights, whatever
transformers version its venv pins.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import random
import shutil
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(HERE, "ckpt")
BASE_DIR = os.path.join(CKPT, "base-fp32")

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 0
MODEL_CFG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 initializer_range=0.2, tie_word_embeddings=False)

# 32 short calibration sentences (passed to the tools as a plain list of strings).
CALIB = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching schedules work at every iteration.",
    "Once upon a time there was a small language model that could.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "héllo wörld café naïve and unicode text",
    "A tokenizer splits text into pieces called tokens.",
    "Quantization stores weights with fewer bits per value.",
    "The scheduler admits requests while memory allows it.",
    "Group-wise scales keep the quantization error small.",
    "Every layer has attention followed by an MLP block.",
    "The model predicts the next token from the previous ones.",
    "Rotary embeddings encode the position of each token.",
    "Zero points shift the integer grid for asymmetric ranges.",
    "Calibration data decides which activations matter most.",
    "The lazy dog did not care about the quick brown fox.",
    "Small models are handy for fast and cheap unit tests.",
    "Prefill processes the prompt; decode makes one token a step.",
    "A block table maps logical blocks to physical blocks.",
    "Sampling with temperature zero is the same as greedy.",
    "Weights are packed eight nibbles to a 32-bit integer.",
    "Half precision halves the memory traffic of a matmul.",
    "The server streams tokens back as soon as they exist.",
    "Speculative decoding drafts tokens and verifies them.",
    "Layer norm and RMS norm rescale the hidden states.",
    "Batch size one is the easiest case to get right.",
    "The cache hit rate rises when prompts share a prefix.",
    "Tensor parallelism splits each matrix across devices.",
    "Numbers like 3.14 and 2.71 show up in many texts.",
    "She sells sea shells by the sea shore every morning.",
    "Red, green and blue mix into many other colours.",
    "This sentence is the last of the calibration set.",
]


def prompts(vocab: int) -> list[list[int]]:
    """4 fixed token-id prompts (lengths 5, 9, 14, 20), ids in [4, vocab) so no special token."""
    rng = random.Random(1234)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in (5, 9, 14, 20)]


def ver(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def env_versions() -> dict:
    pk = ["torch", "transformers", "auto-round", "llmcompressor", "compressed-tensors", "gptqmodel",
          "optimum", "accelerate", "safetensors"]
    return {p: ver(p) for p in pk if ver(p)}


# --------------------------------------------------------------------------------------------
# Formats.  tool: which venv quantizes; spec: tool arguments; loader: how the reference is made.
# --------------------------------------------------------------------------------------------
FORMATS: dict[str, dict] = {
    # auto-round exporting to GPTQ (auto_gptq / gptqmodel layout, checkpoint_format "gptq")
    "autoround-gptq-w4g32-sym": dict(tool="auto-round", bits=4, group_size=32, sym=True, format="auto_gptq"),
    "autoround-gptq-w4g32-asym": dict(tool="auto-round", bits=4, group_size=32, sym=False, format="auto_gptq"),
    "autoround-gptq-w8g64-sym": dict(tool="auto-round", bits=8, group_size=64, sym=True, format="auto_gptq"),
    "autoround-gptq-w8gm1-sym": dict(tool="auto-round", bits=8, group_size=-1, sym=True, format="auto_gptq"),
    # auto-round exporting to AWQ (GEMM layout)
    "autoround-awq-w4g32-asym": dict(tool="auto-round", bits=4, group_size=32, sym=False, format="auto_awq"),
    # auto-round native format (quant_method "auto-round"), gptq-style and awq-style packing
    "autoround-native-gptq-w4g32-sym": dict(tool="auto-round", bits=4, group_size=32, sym=True,
                                            format="auto_round:auto_gptq"),
    "autoround-native-gptq-w4g32-asym": dict(tool="auto-round", bits=4, group_size=32, sym=False,
                                             format="auto_round:auto_gptq", no_reference=(
        "auto-round 0.16.1 has no exact CPU loader for asym auto_round:auto_gptq: backend 'torch' picks "
        "auto_round:fake, which crashes (pad_bits: None + str); the only other CPU backend, "
        "auto_round_kernel_zp (auto-round-lib 0.16.0), deviates by ~0.5 in log-prob from three agreeing "
        "exact loaders on the sym checkpoint, so it is not a reference")),
    "autoround-native-awq-w4g32-asym": dict(tool="auto-round", bits=4, group_size=32, sym=False,
                                            format="auto_round:auto_awq"),
    # auto-round exporting to compressed-tensors (llm_compressor format), W4A16 pack-quantized
    "autoround-ct-w4a16-g32-sym": dict(tool="auto-round", bits=4, group_size=32, sym=True,
                                       format="llm_compressor"),
    # auto-round exporting HF "fp8" (FP8_BLOCK, block-wise fp8 e4m3 weights, dynamic fp8 activations)
    "autoround-fp8-block": dict(tool="auto-round", scheme="FP8_BLOCK", format="fp8", iters=0),
    # llmcompressor oneshot, compressed-tensors
    "llmc-w8a8-int8": dict(tool="llmcompressor", scheme="W8A8"),
    "llmc-fp8-dynamic": dict(tool="llmcompressor", scheme="FP8_DYNAMIC"),
    # GPTQModel GPTQ with act-order
    "gptqmodel-w4g32-descact": dict(tool="gptqmodel", bits=4, group_size=32, sym=True, desc_act=True),
}


# ----------------------------------------------------------------------------- base model
def build_base() -> None:
    import torch
    import transformers

    sys.path.insert(0, REPO)
    try:
        from tests.helpers import make_tokenizer  # the project's tiny byte-level BPE (vocab 320)
        tok = make_tokenizer()
    finally:
        sys.path.pop(0)
    cfg = transformers.LlamaConfig(**MODEL_CFG, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    os.makedirs(BASE_DIR)
    model.save_pretrained(BASE_DIR)
    tok.save_pretrained(BASE_DIR)
    write_reference(BASE_DIR, "base-fp32", model, tool="transformers", tool_version=ver("transformers"),
                    loader="transformers AutoModelForCausalLM.from_pretrained(dtype=float32)")


def load_base(dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=dtype or torch.float32)
    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    return model, tok


def finish_dir(out: str, name: str) -> None:
    """Make sure tokenizer files are there and drop files a loader does not need."""
    for f in os.listdir(BASE_DIR):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "chat_template.jinja"):
            if not os.path.exists(os.path.join(out, f)):
                shutil.copy(os.path.join(BASE_DIR, f), out)
    for f in os.listdir(out):
        if f.endswith(".pt") or f == "quant_log.csv":
            os.remove(os.path.join(out, f))


# ----------------------------------------------------------------------------- auto-round
def quantize_autoround(name: str, spec: dict) -> None:
    import torch
    from auto_round import AutoRound

    model, tok = load_base()
    kw = dict(iters=2, nsamples=8, seqlen=16, batch_size=4, dataset=list(CALIB), device_map="cpu",
              seed=SEED, enable_torch_compile=False, low_gpu_mem_usage=False)
    if "iters" in spec:
        kw["iters"] = spec["iters"]
    if "scheme" in spec:
        kw["scheme"] = spec["scheme"]
    else:
        kw.update(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"])
    ar = AutoRound(model, tokenizer=tok, **kw)
    tmp = tempfile.mkdtemp(prefix=f"ar-{name}-")
    _, folders = ar.quantize_and_save(tmp, format=spec["format"])
    src = folders[0] if isinstance(folders, (list, tuple)) and folders else tmp
    if not os.path.exists(os.path.join(src, "config.json")):  # auto-round may add a sub dir
        subs = [os.path.join(dp) for dp, _, fs in os.walk(tmp) if "config.json" in fs]
        src = subs[0]
    out = os.path.join(CKPT, name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    shutil.rmtree(tmp, ignore_errors=True)
    finish_dir(out, name)
    del torch


# ----------------------------------------------------------------------------- llmcompressor
def quantize_llmcompressor(name: str, spec: dict) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model, tok = load_base()
    recipe = QuantizationModifier(targets="Linear", scheme=spec["scheme"], ignore=["lm_head"])
    out = os.path.join(CKPT, name)
    shutil.rmtree(out, ignore_errors=True)
    # W8A8 and FP8_DYNAMIC use dynamic per-token activation scales: no calibration data needed.
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    finish_dir(out, name)


# ----------------------------------------------------------------------------- gptqmodel
def quantize_gptqmodel(name: str, spec: dict) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
                          desc_act=spec["desc_act"])
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="gptqmodel-"))  # gptqmodel writes ./logs/ into the cwd
    try:
        model = GPTQModel.load(BASE_DIR, qcfg, device="cpu")
        model.quantize(CALIB, batch_size=4)
    finally:
        os.chdir(cwd)
    out = os.path.join(CKPT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save(out)
    finish_dir(out, name)


# ----------------------------------------------------------------------------- references
def last_logprobs(model, ps):
    import torch

    rows, dtypes = [], set()
    model.eval()
    with torch.no_grad():
        for p in ps:
            logits = model(input_ids=torch.tensor([p], dtype=torch.long)).logits
            dtypes.add(str(logits.dtype).replace("torch.", ""))
            rows.append(torch.log_softmax(logits[0, -1].float(), dim=-1).tolist())
    return rows, dtypes


def write_reference(path: str, name: str, model, tool: str, tool_version: str | None, loader: str,
                    note: str | None = None, extra: dict | None = None) -> None:
    cfg = json.load(open(os.path.join(path, "config.json")))
    vocab = cfg["vocab_size"]
    ps = prompts(vocab)
    rows, dtypes = last_logprobs(model, ps)
    linear_types = sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules()
                           if n.endswith(("q_proj", "down_proj", "lm_head"))})
    compute = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    ref = dict(
        format=name, tool=tool, tool_version=tool_version, loader=loader,
        logits_dtype=sorted(dtypes), linear_module_types=linear_types, float_param_dtypes=compute, device="cpu",
        quantization_config=cfg.get("quantization_config"), versions=env_versions(),
        note=note, vocab_size=vocab, prompts=ps,
        description="logprobs[i] = log_softmax of the next-token logits after the LAST token of prompts[i]",
        logprobs=[[round(x, 6) for x in r] for r in rows],
    )
    for k, v in (extra or {}).items():
        ref[k] = [[round(x, 6) for x in r] for r in v] if k.startswith("logprobs") and isinstance(v, list) else v
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    top = [max(range(vocab), key=lambda j: r[j]) for r in rows]
    print(f"[{name}] reference written: argmax={top} loader={loader} logits={sorted(dtypes)}")


def reference(name: str, spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    path = os.path.join(CKPT, name)
    if spec.get("no_reference"):
        if os.path.exists(os.path.join(path, "reference.json")):
            os.remove(os.path.join(path, "reference.json"))
        print(f"[{name}] NO reference: {spec['no_reference']}")
        return
    tool = spec["tool"]
    extra = {"activation_quantization_in_reference": "n/a: weight-only scheme"}
    qc = json.load(open(os.path.join(path, "config.json"))).get("quantization_config", {})
    qm = qc.get("quant_method")
    if qm in ("auto-round", "auto_round"):
        import auto_round  # noqa: F401  (transformers' AutoRoundQuantizer runs on auto-round)
        from transformers import AutoRoundConfig

        backend = os.environ.get("AR_BACKEND", spec.get("ar_backend", "torch"))
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="cpu",
            quantization_config=AutoRoundConfig(backend=backend))
        forced = str(model.dtype).replace("torch.", "")
        loader = (f"transformers.from_pretrained(dtype=float32) + AutoRoundConfig(backend={backend!r});"
                  f" auto-round put the model in {forced}")
        if forced != "float32" and os.environ.get("REF_KEEP_DTYPE") != "1":
            torch.nn.Module.float(model)  # PreTrainedModel.float() refuses quantized models
            loader += "; then torch.nn.Module.float(model) so the reference is computed in float32"
    elif qm in ("gptq", "awq"):
        import gptqmodel  # noqa: F401  (transformers' gptq/awq integration runs on gptqmodel)
        from transformers import AwqConfig, GPTQConfig

        if qm == "gptq":
            backend = "torch"
            qcfg = GPTQConfig(bits=qc["bits"], backend=backend)
        else:
            backend = "torch_awq"
            qcfg = AwqConfig(bits=qc["bits"], backend=backend)
        dtype = getattr(torch, os.environ.get("REF_DTYPE", "float32"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", quantization_config=qcfg)
        loader = (f"transformers.from_pretrained (quant_method {qm}) via gptqmodel {ver('gptqmodel')}"
                  f" backend={backend!r}, dtype={str(dtype).replace('torch.', '')}")
    elif qm == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="cpu",
            quantization_config=CompressedTensorsConfig(run_compressed=False))
        loader = ("transformers.from_pretrained + compressed-tensors decompression "
                  "(CompressedTensorsConfig(run_compressed=False)), dtype=float32")
        acts = [g.get("input_activations") for g in qc.get("config_groups", {}).values()]
        if any(acts):
            # compressed-tensors keeps the dynamic input-activation quantization of the scheme
            # (forward hooks on the decompressed Linear): `logprobs` includes it.  For diagnosis,
            # also record the same model with activation quantization switched off.
            from compressed_tensors.quantization import disable_quantization, enable_quantization

            rows_on, _ = last_logprobs(model, prompts(model.config.vocab_size))
            model.apply(disable_quantization)
            rows_off, _ = last_logprobs(model, prompts(model.config.vocab_size))
            model.apply(enable_quantization)
            rows_again, _ = last_logprobs(model, prompts(model.config.vocab_size))
            assert rows_again == rows_on, "re-enabling activation quantization did not restore the output"
            extra = dict(activation_quantization_in_reference=f"yes: dynamic, {acts[0]}",
                         logprobs_no_act_quant=rows_off,
                         logprobs_no_act_quant_note="same decompressed weights, compressed-tensors "
                                                    "disable_quantization(): input activations NOT quantized")
    elif qm == "fp8":
        from transformers import FineGrainedFP8Config

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
        loader = "transformers.from_pretrained + FineGrainedFP8Config(dequantize=True), dtype=float32"
        extra = dict(activation_quantization_in_reference="no: transformers' dequantize=True path dequantizes "
                     "the fp8 weights and runs plain float32 Linear; the checkpoint's dynamic fp8 activation "
                     "quantization (activation_scheme=dynamic) is NOT applied (its FP8Linear kernels need a GPU)")
    else:
        raise SystemExit(f"{name}: no reference loader for quant_method={qm!r}")
    tool_pkg = {"auto-round": "auto-round", "llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel"}[tool]
    # the tool's version is taken from the checkpoint's own record when the loading venv lacks it
    tv = ver(tool_pkg) or qc.get("autoround_version") or qc.get("quantizer", None)
    write_reference(path, name, model, tool=tool, tool_version=tv, loader=loader, extra=extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["base", "quantize", "reference", "list"])
    ap.add_argument("names", nargs="*", help="formats (default: all of the tool installed in this venv)")
    a = ap.parse_args()
    if a.cmd == "list":
        for n, s in FORMATS.items():
            print(n, s)
        return
    if a.cmd == "base":
        build_base()
        return
    names = a.names or [n for n, s in FORMATS.items() if ver(s["tool"])]
    failed = []
    for n in names:
        spec = FORMATS[n]
        try:
            if a.cmd == "quantize":
                {"auto-round": quantize_autoround, "llmcompressor": quantize_llmcompressor,
                 "gptqmodel": quantize_gptqmodel}[spec["tool"]](n, spec)
                print(f"[{n}] quantized -> {os.path.join(CKPT, n)}")
            else:
                reference(n, spec)
        except Exception:  # keep going: report what failed
            traceback.print_exc()
            failed.append(n)
    if failed:
        print("FAILED:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
