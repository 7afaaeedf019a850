#!/usr/bin/env bash
# The single-GPU runs behind benchmarks/RESULTS.md (their JSON is under benchmarks/results/), in parts
# that each fit one 10-minute device call on `nvidia-h100-x1`:
#
#   bash benchmarks/h100.sh a   # GPU tests, bf16 agreement (16 tokens vs HF and CPU float32), step profile
#   bash benchmarks/h100.sh b   # quantization: GEMMs (W4A16's dense path from M=32) and W4A16/int8 throughput
#   bash benchmarks/h100.sh c   # Qwen3-0.6B throughput with the HF peer in the same run
#   bash benchmarks/h100.sh d   # W4A16 launch-configuration sweep; GPU quant/fp8-KV tests after
#                               # the fixes; bf16 agreement with HF's own bf16 control (Qwen3-0.6B)
#   bash benchmarks/h100.sh e   # the tuned W4A16 kernel: its GPU tests, the GEMV sweep and the
#                               # fused/dequantize crossover, the GEMMs, W4A16/int8 throughput
#   bash benchmarks/h100.sh f   # one-sequence prefill graphs: GPU engine tests and batch-1
#                               # latency (TTFT); W4A16 tiles for large M
#   bash benchmarks/h100.sh g   # the W8A8 int8 Triton kernel: its GPU tests and the tile sweep
#   bash benchmarks/h100.sh h   # W4A16 after the conversion-free unpacking and with swap: GPU
#                               # tests, large-M and batch sweeps; the GEMMs with the tuned int8 tiles
#   bash benchmarks/h100.sh i   # GPU engine tests of the quantized formats; end to end beside bf16
#                               # (random and 1000x1000): int8, fp8, fp8 with the fp8 KV cache
#   bash benchmarks/h100.sh k   # fp8 at small M on the Triton W8A8 kernel: GPU kernel and engine
#                               # tests, the GEMMs, batch-1 and random end to end beside bf16
#   bash benchmarks/h100.sh l   # fp8 activation quantization with the hardware cast and the
#                               # block-scaled fp8 kernel: GPU kernel and engine tests, the GEMMs
#   bash benchmarks/h100.sh m   # the block-scaled fp8 kernel with group-major scales: its GPU
#                               # tests, the fp8 engine tests, the GEMMs
#   bash benchmarks/h100.sh n   # the block-scaled fp8 tile sweep (int8_tune.py --format fp8-block)
#   bash benchmarks/h100.sh p   # fp8 + fp8 KV on TensorRT-LLM's 128x128 and 1000x1000 with
#                               # max_num_seqs 512 beside 256, in one call
#   bash benchmarks/h100.sh q   # W4A16 repacked (w4r, integer-mask dequantization, wgmma): its GPU
#                               # tests, the GEMMs beside bf16 and the GPTQ-layout kernel, the tile sweep
#   bash benchmarks/h100.sh r   # W4A16 (w4r) with the tuned tiles: engine tests of the quantized
#                               # checkpoints, the GEMMs beside bf16
#   bash benchmarks/h100.sh v   # w4r with block_m 256 up to 256 rows: GPU tests; K split up to 4x at
#                               # small M; the fused/dequantize crossover past 256 rows
#   bash benchmarks/h100.sh w   # block-scaled fp8 through cuBLAS (torch._scaled_mm 1x128 x 128x128):
#                               # GPU kernel and fp8 engine tests, the GEMMs beside bf16, per-channel
#                               # fp8 and the Triton block kernel
#   bash benchmarks/h100.sh s   # W4A16 (w4r) final tiles: the GEMMs beside bf16 and the checkpoint-layout
#                               # kernel, end to end beside bf16 (batch 1 and random)
#   bash benchmarks/h100.sh j   # end to end beside bf16 (batch 1 and random): W4A16, and bf16,
#                               # int8 and W4A16 with the fp8 KV cache
#
# The device needs pytest carried (.gpu-test wheels, see the device notes) for part a.
# Result JSONs and logs go to $RESULTS_OUT (default /tmp/raylm-h100).
set -u
part=${1:-a}
res=${RESULTS_OUT:-/tmp/raylm-h100}
mkdir -p "$res"
step() {  # step NAME SECONDS command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  OUT=$res timeout -k 10 "$limit" "$@" >"$res/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"
  grep -E "raylm:|raylm_vs|passed|failed|tok/s|Error" "$res/$name.log" | tail -8
}
B=benchmarks
case $part in
a)
  step pytest 260 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu
  step agree-qwen 90 python3 $B/agreement.py --model qwen3-0.6b --layers 4
  step agree-llama 120 python3 $B/agreement.py --model llama-3.1-8b --layers 4
  step profile 60 python3 $B/step_profile.py --model qwen3-0.6b
  ;;
b)
  step gemm 150 python3 $B/quant_gemm.py --reps 10
  step qthr 300 python3 $B/quant_throughput.py --formats w4a16-gptq,int8 --kv-cache-dtypes auto \
    --workloads random --no-bf16 --tag w4-int8
  ;;
c)
  step thr-qwen-hf 500 python3 $B/throughput.py --model qwen3-0.6b --hf-batch-size 128
  ;;
d)
  step tune 240 python3 $B/w4a16_tune.py
  step pytest 200 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py \
    tests/gpu/test_kv_cache_fp8_gpu.py tests/gpu/test_quant_engine_gpu.py
  step agree-qwen 60 python3 $B/agreement.py --model qwen3-0.6b --layers 4
  ;;
e)
  step pytest 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py
  step tune 100 python3 $B/w4a16_tune.py --stages batch --m 16,64,128,256,512
  step gemm 90 python3 $B/quant_gemm.py --reps 10 --formats bf16,w4a16-gptq-no-gidx,w4a16-awq,w8a8-int8
  step qthr 270 python3 $B/quant_throughput.py --formats w4a16-gptq,int8 --kv-cache-dtypes auto \
    --workloads random --no-bf16 --tag w4-int8
  ;;
f)
  step pytest 200 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_engine_gpu.py \
    tests/gpu/test_quant_kernels_gpu.py -k "engine or graphs or async or w4a16"
  step lat-qwen 70 python3 $B/latency.py --model qwen3-0.6b --peer none
  step lat-llama 90 python3 $B/latency.py --model llama-3.1-8b --peer none
  step tune 150 python3 $B/w4a16_tune.py --stages large --large-m 256,512
  ;;
g)
  step pytest 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py -k int8
  step int8tune 420 python3 $B/int8_tune.py --m 1,16,32,64,128,256,512,4096
  ;;
h)
  step pytest 110 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py -k "w4a16 or int8"
  step tune 250 python3 $B/w4a16_tune.py --stages large,batch --large-m 256,512 --m 1,64,128
  step gemm 150 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,512,4096 \
    --formats bf16,w4a16-gptq-no-gidx,w4a16-awq,w8a8-int8
  ;;
i)
  step pytest 100 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_engine_gpu.py
  step qthr 460 python3 $B/quant_throughput.py --runs bf16:auto,int8:auto,fp8:auto,fp8:fp8 \
    --workloads batch1,random,1000x1000 --tag int8-fp8
  ;;
j)
  step qthr 500 python3 $B/quant_throughput.py \
    --runs bf16:auto,bf16:fp8,int8:fp8,w4a16-gptq:auto,w4a16-gptq:fp8 --workloads batch1,random --tag w4-fp8kv
  ;;
k)
  step pytest 130 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_engine_gpu.py \
    tests/gpu/test_quant_kernels_gpu.py -k "fp8 or int8 or checkpoint or online or graph"
  step gemm 50 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,512 --formats bf16,fp8
  step qthr 130 python3 $B/quant_throughput.py --runs bf16:auto,fp8:auto --workloads batch1,random --tag fp8-triton
  ;;
l)
  step pytest 170 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_engine_gpu.py \
    tests/gpu/test_quant_kernels_gpu.py -k "fp8 or checkpoint"
  step gemm 120 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,512,4096 --formats bf16,fp8,fp8-block
  ;;
m)
  step pytest 130 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_engine_gpu.py \
    tests/gpu/test_quant_kernels_gpu.py -k "fp8_block or per_token_quant_fp8 or checkpoint"
  step gemm 90 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,512,4096 --formats bf16,fp8,fp8-block
  ;;
n)
  step tune 420 python3 $B/int8_tune.py --format fp8-block --m 64,512,4096 --reps 10
  ;;
p)
  step qthr-512 200 python3 $B/quant_throughput.py --runs fp8:fp8 --workloads 128x128,1000x1000 \
    --max-num-seqs 512 --tag fp8-seqs512
  step qthr-256 200 python3 $B/quant_throughput.py --runs fp8:fp8 --workloads 128x128,1000x1000 \
    --max-num-seqs 256 --tag fp8-seqs256
  ;;
q)
  step pytest 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py \
    tests/test_quant_kernels.py -k "w4r or w4a16"
  step gemm 120 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,128,256,512 \
    --formats bf16,w4a16-gptq-no-gidx,w4a16-w4r
  step tune 300 python3 $B/w4a16_tune.py --stages w4r --m 1,16,64,128 --large-m 256,512
  ;;
r)
  step pytest 240 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_engine_gpu.py \
    tests/test_quant_kernels.py -k "w4r or gptq or awq or w4a16 or ct"
  step gemm 120 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,128,256,512 --formats bf16,w4a16-w4r
  ;;
v)
  step pytest 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py \
    tests/test_quant_kernels.py -k w4r
  step tune 400 python3 $B/w4a16_tune.py --stages w4r --m 1,16 --large-m 384,512
  ;;
w)
  step pytest 200 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/gpu/test_quant_kernels_gpu.py \
    tests/gpu/test_quant_engine_gpu.py -k "fp8"
  step gemm 200 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,128,256,512,1024,4096 \
    --formats bf16,fp8,fp8-block,fp8-block-cublas
  ;;
s)
  step gemm 100 python3 $B/quant_gemm.py --reps 10 --m 1,16,64,128,256,512 \
    --formats bf16,w4a16-gptq-no-gidx,w4a16-awq,w4a16-w4r
  step qthr 450 python3 $B/quant_throughput.py --runs bf16:auto,w4a16-gptq:auto --workloads batch1,random --tag w4r
  ;;
esac
exit 0
