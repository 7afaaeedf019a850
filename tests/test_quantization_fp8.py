"""fp8 and int8 W8A8: HF fine-grained fp8 block checkpoints (auto-round's export in
tests/quant/ckpt/autoround-fp8-block) and online quantization of a dense checkpoint
(`quantization="fp8"` / `"int8"`). raylm computes the same function as a float32
re-implementation written here from the formats' definitions (transformers' dense Llama
with dequantized weights and quantize-dequantized activations), and as the tool's own
loader where that one skips activation quantization; and the same at TP=2 as at TP=1."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from raylm import LLM
from tests.test_quantization import (CKPT, PROMPTS, _tensors, assert_tp2_matches_tp1, compare,
                                     raylm_logprobs)

FP8_BLOCK = os.path.join(CKPT, "autoround-fp8-block")
BASE = os.path.join(CKPT, "base-fp32")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dense_model(d: str, state: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(d)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def _on_linear_inputs(model, fn) -> None:
    """Run every decoder Linear on fn(its input) (the activation quantization)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in LINEARS:
            mod.register_forward_pre_hook(lambda m, args: (fn(args[0]),))


def _fp8_e4m3(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def fp8_block_reference(act_quant: bool = True):
    """weight * weight_scale_inv block by block (a last partial block keeps its own scale);
    activations per token in groups of block_k channels, scale = max(amax, 1e-10) / 448."""
    qc = json.load(open(os.path.join(FP8_BLOCK, "config.json")))["quantization_config"]
    bn, bk = qc["weight_block_size"]
    tensors = _tensors(FP8_BLOCK)
    state = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[name + "_scale_inv"].float()
            w = t.float()
            for i in range(s.shape[0]):
                for j in range(s.shape[1]):
                    w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] *= s[i, j]
            state[name] = w
        else:
            state[name] = t.float()
    model = _dense_model(FP8_BLOCK, state)

    def quant_dequant(x):
        assert x.shape[-1] % bk == 0
        g = x.unflatten(-1, (-1, bk))
        scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
        return (_fp8_e4m3(g / scale) * scale).flatten(-2)

    if act_quant:
        _on_linear_inputs(model, quant_dequant)
    return model


def online_reference(scheme: str):
    """Per output row: scale = amax / qmax, w ~= q * scale; per token activations: fp8
    scale = max(amax, 1e-10) / 448; int8 as vLLM, scale = amax / 127, q = round(x * 127 / amax)."""
    state = {k: v.float() for k, v in _tensors(BASE).items()}
    for name, w in state.items():
        if name.split(".")[-2] in LINEARS:
            scale = w.abs().amax(1, keepdim=True) / (448.0 if scheme == "fp8" else 127.0)
            q = _fp8_e4m3(w / scale) if scheme == "fp8" else torch.round(w / scale).clamp(-128, 127)
            state[name] = q * scale
    model = _dense_model(BASE, state)

    def quant_dequant(x):
        amax = x.abs().amax(-1, keepdim=True)
        if scheme == "fp8":
            scale = amax.clamp(min=1e-10) / 448.0
            return _fp8_e4m3(x / scale) * scale
        return torch.round((x * (127.0 / amax)).clamp(-128, 127)) * (amax / 127.0)

    _on_linear_inputs(model, quant_dequant)
    return model


def logprobs_of(model, prompts) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([torch.log_softmax(model(torch.tensor([p])).logits[0, -1], -1) for p in prompts])


def _no_act_quant(monkeypatch):
    from raylm.workers.quantization import fp8

    monkeypatch.setattr(fp8, "quant_dequant_groups", lambda x, group_size: x.float())


@pytest.fixture(scope="module")
def fp8_block_llm():
    # No prefix caching: a test switches activation quantization off between requests.
    llm = LLM(FP8_BLOCK, dtype="float32", max_model_len=128, max_logprobs=20, enable_prefix_caching=False)
    yield llm
    llm.shutdown()


def test_fp8_block_matches_float32_arithmetic(fp8_block_llm):
    """One prompt at a time, as the reference runs: batched, float32 matmuls round
    differently in the last bit, which here moved one activation of layer 0's down_proj
    across an fp8 rounding boundary (4.8e-7 relative) and this ill-conditioned random
    model amplified that to 0.13 nats. Dynamic activation quantization is not batch
    invariant, in raylm or vLLM."""
    ours = [raylm_logprobs(fp8_block_llm, [p])[0] for p in PROMPTS]
    ref = logprobs_of(fp8_block_reference(), PROMPTS)
    # Even one prompt at a time the two sum float32 products in different orders (our
    # fused qkv/gate_up matmuls against the reference's separate ones), and on some CPUs
    # (the BLAS kernel depends on the instruction set) that flips one activation of one
    # prompt across an fp8 rounding boundary: about 0.13 nats on this model. Every other
    # prompt matches to rounding; at most one may show such a flip.
    errors = sorted(compare([o], r.unsqueeze(0), atol=0.3) for o, r in zip(ours, ref))
    assert errors[-2] <= 2e-4, errors
    layer = fp8_block_llm.llm_engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale_inv.shape == (256, 1)  # q 128 rows, k and v 64 (partial blocks)


def test_fp8_block_matches_the_tools_loader(fp8_block_llm, monkeypatch):
    """The tool's reference dequantizes the weights and runs plain float32 Linear (no
    activation quantization: reference.json says so). With ours switched off the two
    agree to float32 rounding; with it on, they differ by the activation quantization
    error, measured here on the float32 re-implementation (1.74 nats on this
    deliberately ill-conditioned random model)."""
    ref = json.load(open(os.path.join(FP8_BLOCK, "reference.json")))
    prompts, tool = ref["prompts"], torch.tensor(ref["logprobs"])
    assert ref["activation_quantization_in_reference"].startswith("no")
    act_error = (logprobs_of(fp8_block_reference(True), prompts)
                 - logprobs_of(fp8_block_reference(False), prompts)).abs().max().item()
    assert 0.1 < act_error < 3.0, act_error
    worst = max(abs(lp - float(tool[i][t])) for i, got in enumerate(raylm_logprobs(fp8_block_llm, prompts))
                for t, lp in got.items())
    assert worst <= act_error + 1e-3, (worst, act_error)
    _no_act_quant(monkeypatch)
    compare(raylm_logprobs(fp8_block_llm, prompts), tool, atol=1e-3)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_online_quantization_matches_float32_arithmetic(scheme):
    llm = LLM(BASE, dtype="float32", max_model_len=128, max_logprobs=20, quantization=scheme)
    try:
        compare(raylm_logprobs(llm, PROMPTS), logprobs_of(online_reference(scheme), PROMPTS), atol=2e-4)
        model = llm.llm_engine.executor.runner.model
        for layer in (model.model.layers[0].self_attn.qkv_proj, model.model.layers[1].mlp.down_proj):
            assert layer.weight.dtype == (torch.float8_e4m3fn if scheme == "fp8" else torch.int8)
            assert layer.weight_scale.shape == (layer.output_size_per_partition,)
            # the dense weight is gone: nothing float of the weight's size is left
            assert not [n for n, p in layer.named_parameters()
                        if p.dtype == torch.float32 and p.numel() == layer.weight.numel()]
        assert model.lm_head.weight.dtype == torch.float32  # left dense
    finally:
        llm.shutdown()


def test_online_int8_tensor_parallel_equals_single_rank(ray_session):
    assert_tp2_matches_tp1(BASE, quantization="int8")


def test_fp8_config_errors_name_the_key():
    from raylm.workers.quantization import get_quant_config

    class Cfg:
        quantization_config = {"quant_method": "fp8", "activation_scheme": "static",
                               "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="activation_scheme 'static'"):
        get_quant_config(Cfg())
    Cfg.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    with pytest.raises(ValueError, match="weight_block_size None"):
        get_quant_config(Cfg())


def test_fp8_block_row_shard_must_hold_whole_blocks():
    from raylm.workers.layers.linear import RowParallelLinear
    from raylm.workers.parallel_state import set_tensor_parallel
    from raylm.workers.quantization.fp8 import FP8Config

    qc = FP8Config.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    set_tensor_parallel(0, 2)
    try:
        with pytest.raises(ValueError, match="o_proj: input size per tensor-parallel rank 64 .of 128."):
            RowParallelLinear(128, 128, quant_config=qc, prefix="model.layers.0.self_attn.o_proj")
        RowParallelLinear(256, 128, quant_config=qc, prefix="model.layers.0.mlp.down_proj")  # 128 per rank
    finally:
        set_tensor_parallel(0, 1)
