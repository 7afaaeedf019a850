"""Quantized matmul kernels by family, each beside its PyTorch reference: pack (checkpoint
packings, dequantization), w4a16 (GPTQ/AWQ layouts), w4r (the GPU's repacked 4-bit
layout), w8a8 (int8 and per-token fp8), fp8_block (block-scaled fp8), and act (the
activation quantizers). Their public names are re-exported here."""
from raylm.kernels.quant.act import (FP8_EPS, FP8_MAX, per_token_quant_fp8,  # noqa: F401
                                     per_token_quant_fp8_ref, per_token_quant_int8,
                                     per_token_quant_int8_ref)
from raylm.kernels.quant.fp8_block import (FP8_BLOCK_CONFIGS, FP8_BLOCK_CUBLAS_MIN_M,  # noqa: F401
                                           block_scaled_mm_ok, block_scales_for_cublas,
                                           dequantize_groups, fp8_block_config, fp8_block_gemm,
                                           fp8_block_gemm_ref, fp8_block_scaled_mm)
from raylm.kernels.quant.pack import (AWQ_ORDER, AWQ_REVERSE_ORDER, LAYOUTS,  # noqa: F401
                                      dequantize_awq, dequantize_gptq, pack_rows, unpack_awq,
                                      unpack_gptq, unpack_rows)
from raylm.kernels.quant.w4a16 import (DECODE_CONFIG, DEQUANT_CONFIG, DEQUANT_MIN_M,  # noqa: F401
                                       INTERPRET_CONFIG, MAX_BLOCK_M, TARGET_PROGRAMS, W4Config,
                                       pick_config, w4a16_gemm, w4a16_gemm_ref, with_split)
from raylm.kernels.quant.w4r import (W4R_BASE, W4R_CONFIGS, W4R_DEQUANT_MIN_M,  # noqa: F401
                                     W4R_SLOT, W4R_SPLIT_TARGET, dequantize_w4r, pick_w4r_config,
                                     repack_w4, w4r_gemm)
from raylm.kernels.quant.w8a8 import (FP8_TRITON_MAX_M, INT8_CONFIGS, I8Config, _scale_epilogue,  # noqa: F401
                                      fp8_gemm, fp8_gemm_ref, int8_with_split, pick_int8_config,
                                      w8a8_int8_gemm, w8a8_int8_gemm_ref)
