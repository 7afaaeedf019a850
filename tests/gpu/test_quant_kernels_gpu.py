"""The quantization kernels against their PyTorch references at Llama-3.1-8B's linear
shapes (hidden 4096, intermediate 14336, qkv 6144) in bf16/fp16, decode and prefill
batch sizes, plus a CUDA-graph capture of the decode path. Skipped without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU (and compiled, not interpreted, Triton)", allow_module_level=True)

from raylm.kernels.quant.act import (  # noqa: E402
    per_token_quant_fp8, per_token_quant_fp8_ref, per_token_quant_int8,
    per_token_quant_int8_ref)
from raylm.kernels.quant import (  # noqa: E402
    I8Config, INT8_CONFIGS, W4Config, block_scaled_mm_ok, block_scales_for_cublas, fp8_block_gemm,
    fp8_block_gemm_ref, fp8_block_scaled_mm, fp8_gemm, fp8_gemm_ref, repack_w4, unpack_awq, unpack_gptq,
    w4a16_gemm, w4a16_gemm_ref, w4r_gemm, w8a8_int8_gemm, w8a8_int8_gemm_ref)

# (K, N): qkv_proj, o_proj, gate_up_proj (one half), down_proj
LLAMA_8B = [(4096, 6144), (4096, 4096), (4096, 14336), (14336, 4096)]
BATCHES = [1, 7, 16, 24, 100, 300, 512]  # fused below quant_gemm.DEQUANT_MIN_M, then dequantize + cuBLAS
HAS_FP8 = torch.cuda.get_device_capability() >= (8, 9)


def assert_close_rel(out, ref, tol):
    """Max error relative to the output's scale: dequantized tiles are rounded to
    bf16/fp16 before the tensor-core dot, the reference keeps them in float32."""
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, f"max error {err:.4g} vs output scale {scale:.4g}"


def random_packed(k, n, bits, group_size, layout, act_order, gen):
    pack = 32 // bits
    shape = (k // pack, n) if layout == "gptq" else (k, n // pack)
    qweight = torch.randint(-2 ** 31, 2 ** 31, shape, generator=gen, device="cuda", dtype=torch.int32)
    num_groups = k // group_size
    qzeros = torch.randint(-2 ** 31, 2 ** 31, (num_groups, n // pack), generator=gen,
                           device="cuda", dtype=torch.int32)
    scales = (torch.rand(num_groups, n, generator=gen, device="cuda") * 0.01 + 1e-3).half()
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=gen, device="cuda") // group_size).int()
    return qweight, scales, qzeros, g_idx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", LLAMA_8B)
@pytest.mark.parametrize("layout,bits,act_order", [
    ("gptq", 4, False), ("gptq", 4, True), ("gptq", 8, False), ("awq", 4, False)])
def test_w4a16_gemm(layout, bits, act_order, k, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(k + n + bits)
    qweight, scales, qzeros, g_idx = random_packed(k, n, bits, 128, layout, act_order, gen)
    zero_offset = 1 if layout == "gptq" else 0
    for m in BATCHES:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
        out = w4a16_gemm(x, qweight, scales, qzeros, g_idx, 128, layout, bits, zero_offset)
        ref = w4a16_gemm_ref(x, qweight, scales, qzeros, g_idx, 128, layout, bits, zero_offset)
        assert out.dtype == dtype
        assert_close_rel(out, ref, 1e-2)


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_w4a16_gemm_launch_configs(layout, expand):
    # What benchmarks/w4a16_tune.py sweeps must compile and compute the same product:
    # tile shapes that fit in shared memory (from the 2026-11-27 sweep), K split across
    # programs, packed words unpacked in registers.
    gen = torch.Generator(device="cuda").manual_seed(int(expand))
    k, n = 4096, 4096
    qweight, scales, qzeros, _ = random_packed(k, n, 4, 128, layout, False, gen)
    zero_offset = 1 if layout == "gptq" else 0
    configs = [(16, 64, 128, 1, 4, 2), (16, 128, 64, 4, 4, 2), (16, 256, 64, 8, 4, 2), (16, 32, 128, 3, 4, 2),
               (32, 64, 64, 2, 4, 2), (128, 128, 64, 1, 8, 3), (128, 256, 32, 1, 8, 3)]  # ... warps, stages
    for bm, bn, bk, split, warps, stages in configs:
        cfg = W4Config(bm, bn, bk, split, expand, warps, stages)
        for m in (1, 3, 32, 200):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            out = w4a16_gemm(x, qweight, scales, qzeros, None, 128, layout, zero_offset=zero_offset,
                             config=cfg)
            ref = w4a16_gemm_ref(x, qweight, scales, qzeros, None, 128, layout, zero_offset=zero_offset)
            assert_close_rel(out, ref, 1e-2)


@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (128, True)])
def test_w4a16_gemm_chosen_configs_small_and_scattered_groups(group_size, act_order):
    # The production choice (pick_config) where groups are smaller than a K tile or
    # scattered by g_idx, across the fused range of rows.
    gen = torch.Generator(device="cuda").manual_seed(group_size)
    k, n = 4096, 6144
    qweight, scales, qzeros, g_idx = random_packed(k, n, 4, group_size, "gptq", act_order, gen)
    for m in (1, 16, 40, 130):
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        out = w4a16_gemm(x, qweight, scales, qzeros, g_idx, group_size, "gptq", zero_offset=1)
        ref = w4a16_gemm_ref(x, qweight, scales, qzeros, g_idx, group_size, "gptq", zero_offset=1)
        assert_close_rel(out, ref, 1e-2)


def test_w4a16_gemm_one_group_and_bias():
    gen = torch.Generator(device="cuda").manual_seed(0)
    k, n = 4096, 6144
    qweight, scales, qzeros, _ = random_packed(k, n, 4, k, "gptq", False, gen)
    bias = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    for m in (1, 300):
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        out = w4a16_gemm(x, qweight, scales, qzeros, None, -1, "gptq", bias=bias)
        ref = w4a16_gemm_ref(x, qweight, scales, qzeros, None, -1, "gptq", bias=bias)
        assert_close_rel(out, ref, 1e-2)


def test_w4a16_gemm_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(1)
    k, n = 4096, 14336
    qweight, scales, qzeros, _ = random_packed(k, n, 4, 128, "awq", False, gen)
    x = torch.randn(8, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    w4a16_gemm(x, qweight, scales, qzeros, None, 128, "awq")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_gemm(x, qweight, scales, qzeros, None, 128, "awq")
    x.copy_(torch.randn(8, k, generator=gen, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    assert_close_rel(out, w4a16_gemm_ref(x, qweight, scales, qzeros, None, 128, "awq"), 1e-2)


# ---------------------------------------------------------------- w4r (the layout 4-bit layers use on the GPU)

W4R_TUNE_CONFIGS = [(16, 64, 64, 1, 4, 3), (16, 128, 64, 2, 4, 4), (16, 256, 64, 4, 4, 4), (16, 128, 128, 1, 4, 3),
                    (32, 128, 64, 1, 4, 3), (64, 128, 64, 1, 4, 3), (64, 256, 64, 1, 8, 3), (128, 128, 64, 1, 4, 3),
                    (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (256, 128, 64, 1, 8, 3)]


def _to_w4r(layout, qweight, scales, qzeros, dtype):
    zero_offset = 1 if layout == "gptq" else 0
    q, z = (unpack_gptq if layout == "gptq" else unpack_awq)(qweight, qzeros)
    return repack_w4(q, z, scales, dtype, zero_offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", LLAMA_8B)
@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_w4r_gemm_matches_the_original_layout(layout, k, n, dtype):
    # The repacked weight computes the checkpoint layout's function (its float32
    # reference) at every batch size: fused (K split at small M), then dequantize + cuBLAS.
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    qweight, scales, qzeros, _ = random_packed(k, n, 4, 128, layout, False, gen)
    zero_offset = 1 if layout == "gptq" else 0
    rq, rs, zb = _to_w4r(layout, qweight, scales, qzeros, dtype)
    for m in BATCHES:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
        out = w4r_gemm(x, rq, rs, zb, 128)
        ref = w4a16_gemm_ref(x, qweight, scales, qzeros, None, 128, layout, 4, zero_offset)
        assert out.dtype == dtype
        assert_close_rel(out, ref, 1e-2)


def test_w4r_gemm_launch_configs():
    # What benchmarks/w4a16_tune.py sweeps (stage w4r) compiles and computes the same product.
    gen = torch.Generator(device="cuda").manual_seed(3)
    k, n = 4096, 4096
    qweight, scales, qzeros, _ = random_packed(k, n, 4, 128, "gptq", False, gen)
    rq, rs, zb = _to_w4r("gptq", qweight, scales, qzeros, torch.bfloat16)
    for bm, bn, bk, split, warps, stages in W4R_TUNE_CONFIGS:
        cfg = W4Config(bm, bn, bk, split, False, warps, stages)
        for m in (1, 3, 32, 200):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            out = w4r_gemm(x, rq, rs, zb, 128, config=cfg)
            ref = w4a16_gemm_ref(x, qweight, scales, qzeros, None, 128, "gptq", zero_offset=1)
            assert_close_rel(out, ref, 1e-2)


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_w4r_gemm_group_sizes_symmetric_and_bias(group_size):
    gen = torch.Generator(device="cuda").manual_seed(group_size % 97)
    k, n = 4096, 6144
    qweight, scales, _, _ = random_packed(k, n, 4, k if group_size == -1 else group_size, "gptq", False, gen)
    q, _ = unpack_gptq(qweight, None)
    rq, rs, zb = repack_w4(q, None, scales, torch.bfloat16)  # symmetric: zero 8
    bias = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    for m in (1, 16, 40, 130, 300):
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        out = w4r_gemm(x, rq, rs, zb, group_size, bias=bias)
        ref = w4a16_gemm_ref(x, qweight, scales, None, None, group_size, "gptq", bias=bias)
        assert_close_rel(out, ref, 1e-2)


def test_w4r_gemm_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(1)
    k, n = 4096, 14336
    qweight, scales, qzeros, _ = random_packed(k, n, 4, 128, "awq", False, gen)
    rq, rs, zb = _to_w4r("awq", qweight, scales, qzeros, torch.bfloat16)
    x = torch.randn(8, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    w4r_gemm(x, rq, rs, zb, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4r_gemm(x, rq, rs, zb, 128)
    x.copy_(torch.randn(8, k, generator=gen, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    assert_close_rel(out, w4a16_gemm_ref(x, qweight, scales, qzeros, None, 128, "awq"), 1e-2)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("convention", ["vllm", "compressed-tensors"])
@pytest.mark.parametrize("k", [4096, 14336])
def test_per_token_quant_int8(k, convention, dtype):
    x = torch.randn(333, k, device="cuda", dtype=dtype) * 3
    x[7] = 0
    q, scale = per_token_quant_int8(x, convention)
    q_ref, scale_ref = per_token_quant_int8_ref(x, convention)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.skipif(not HAS_FP8, reason="fp8 needs sm89+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("k", [4096, 14336])
def test_per_token_quant_fp8(k, group_size, dtype):
    x = torch.randn(333, k, device="cuda", dtype=dtype) * torch.logspace(-4, 2, k, device="cuda").to(dtype)
    x[7] = 0
    q, scale = per_token_quant_fp8(x, group_size)
    q_ref, scale_ref = per_token_quant_fp8_ref(x, group_size)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", LLAMA_8B)
def test_w8a8_int8_gemm(k, n, out_dtype):
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    w_q = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen, device="cuda") * 1e-3
    bias = torch.randn(n, generator=gen, device="cuda", dtype=out_dtype)
    for m in BATCHES + [17]:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=out_dtype)
        x_q, x_scale = per_token_quant_int8(x)
        out = w8a8_int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        ref = w8a8_int8_gemm_ref(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        assert_close_rel(out, ref, 1e-2)


@pytest.mark.parametrize("config", [c for _, c in INT8_CONFIGS] + [I8Config(64, 128, 128, 4, 8, 4, 3)])
def test_w8a8_int8_kernel_configs(config):
    """Every shipped tile (and a K split) compiles at a real shape and gives the
    reference's float32 result: int32 sums are exact, the epilogue is float32."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    k, n = 4096, 6144
    w_q = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    for m in (1, 77, 300):
        x_q = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
        x_scale = torch.rand(m, 1, generator=gen, device="cuda")
        for w_scale in (torch.rand(n, generator=gen, device="cuda"), torch.rand((), device="cuda")):
            out = w8a8_int8_gemm(x_q, x_scale, w_q, w_scale, None, torch.float32, config=config)
            ref = w8a8_int8_gemm_ref(x_q, x_scale, w_q, w_scale, None, torch.float32)
            torch.testing.assert_close(out, ref, atol=0, rtol=1e-6)


@pytest.mark.skipif(not HAS_FP8, reason="fp8 needs sm89+")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor_w", [False, True])
@pytest.mark.parametrize("k,n", LLAMA_8B)
def test_fp8_gemm(k, n, per_tensor_w, out_dtype):
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    w = torch.randn(n, k, generator=gen, device="cuda")
    w_scale = w.abs().amax() / 448 if per_tensor_w else w.abs().amax(-1) / 448
    w_q = (w / w_scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
    for m in BATCHES + [17]:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=out_dtype)
        x_q, x_scale = per_token_quant_fp8(x)
        out = fp8_gemm(x_q, x_scale, w_q, w_scale, None, out_dtype)
        ref = fp8_gemm_ref(x_q, x_scale, w_q, w_scale, None, out_dtype)
        assert out.dtype == out_dtype
        assert_close_rel(out, ref, 1e-2)


@pytest.mark.skipif(not HAS_FP8, reason="fp8 needs sm89+")
@pytest.mark.parametrize("k,n", LLAMA_8B)
def test_fp8_block_gemm(k, n):
    """HF fp8 block checkpoints' GEMM (128x128 weight blocks, activations per 128
    channels) at every batch size and a K split, against the float32 reference."""
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    w = torch.randn(n, k, generator=gen, device="cuda")
    w_scale = w.unflatten(1, (-1, 128)).abs().amax(-1) / 448
    w_scale = w_scale.unflatten(0, (-1, 128)).amax(1).repeat_interleave(128, 0)  # 128x128 blocks
    w_q = (w / w_scale.repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
    w_scale = w_scale.t().contiguous().t()  # group-major, as FP8BlockLinearMethod keeps it
    for m in BATCHES + [17]:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        x_q, x_scale = per_token_quant_fp8(x, 128, group_major=True)
        ref = fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, 128, None, torch.float32)
        out = fp8_block_gemm(x_q, x_scale, w_q, w_scale, 128, None, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        assert_close_rel(out, ref, 1e-2)
        out = fp8_block_gemm(x_q, x_scale, w_q, w_scale, 128, None, torch.float32,
                             config=I8Config(64, 128, 128, 4, 8, 4, 3))
        torch.testing.assert_close(out, ref, atol=1e-3 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0), reason="cuBLAS block scaling: sm90")
@pytest.mark.parametrize("k,n", LLAMA_8B)
def test_fp8_block_scaled_mm(k, n):
    """The same product through cuBLAS's 1x128 x 128x128 block scaling, every batch size
    (M not a multiple of 4 padded), bias or none, against the float32 reference."""
    assert block_scaled_mm_ok(torch.empty(1, device="cuda"), k, n, 128)
    gen = torch.Generator(device="cuda").manual_seed(k + n + 1)
    w = torch.randn(n, k, generator=gen, device="cuda")
    w_scale = w.unflatten(1, (-1, 128)).abs().amax(-1) / 448
    w_scale = w_scale.unflatten(0, (-1, 128)).amax(1).repeat_interleave(128, 0)
    w_q = (w / w_scale.repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
    blocks = block_scales_for_cublas(w_scale)
    bias = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    for m in BATCHES + [17]:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        x_q, x_scale = per_token_quant_fp8(x, 128, group_major=True)
        b = bias if m % 2 else None
        ref = fp8_block_gemm_ref(x_q, x_scale, w_q, w_scale, 128, b, torch.float32)
        out = fp8_block_scaled_mm(x_q, x_scale, w_q, blocks, b, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert_close_rel(out, ref, 1e-2)
