#!/usr/bin/env bash
# The multi-GPU runs (tensor parallelism over NCCL, several worker groups, the Serve app)
# on one host with 4 GPUs, in parts that each fit one 10-minute device call:
#
#   bash benchmarks/multi_gpu.sh a   # TP correctness (Llama-3.1-8B), throughput TP=1/2/4 and 2 groups x TP=1
#   bash benchmarks/multi_gpu.sh b   # TP correctness (Qwen3-8B), batch-1 latency TP=1/2/4, Serve app 2 and 1 groups
#   bash benchmarks/multi_gpu.sh c   # throughput and latency TP=1/2/4, 2 groups, Serve app 2 groups, Qwen3-8B TP correctness
#   bash benchmarks/multi_gpu.sh d   # what c could not finish on 2026-11-27: the Serve app (2 groups, then 1),
#                                    # TP correctness with the near-tie analysis, scaling re-measured
#   bash benchmarks/multi_gpu.sh e   # d's first half in one call: the Serve app (2 groups, then 1)
#                                    # and TP correctness of both models
#   bash benchmarks/multi_gpu.sh f   # after the multiplexed output stream: the Serve app (2 groups,
#                                    # then 1); 1024 requests on TP=1 and on 2 groups x TP=1
#   bash benchmarks/multi_gpu.sh g   # f's Serve app runs again (2 groups ran out of time in f)
#
# Each step has a time limit, so a hang shows as rc=124 instead of eating the call; result
# JSONs and logs go to $RESULTS_OUT (default /tmp/raylm-multi). NVLink multicast stays off.
# The results kept under benchmarks/results/, all on 4x H200 on 2026-11-27:
#   multi_gpu-4xh200-sync-loop/                  part a, before asynchronous scheduling
#   multi_gpu-4xh200-async-scheduling/           part c's throughput and latency
#   multi_gpu-4xh200-tp-correctness-and-serving-128-streams/           part e
#   multi_gpu-4xh200-offline-1024-requests-and-serving-256-streams/    part f
#   multi_gpu-4xh200-serving-256-streams/        part g
set -u
part=${1:-a}
res=${RESULTS_OUT:-/tmp/raylm-multi}
mkdir -p "$res"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS script args...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  OUT=$res timeout -k 10 "$limit" python3 "$@" >"$res/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0)) s"
  grep -E "^(TP=|raylm:|all-reduce|app up|[0-9]+ output tok|\{'prompt_len)|Error|error:" "$res/$name.log" | tail -6
  if [ $rc -ne 0 ]; then
    tail -15 "$res/$name.log"
    python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
    pkill -9 -f "python3 benchmarks/" >/dev/null 2>&1
  fi
  return $rc
}

B=benchmarks
case $part in
a)
  step tpc-llama 240 $B/tp_correctness.py --model llama-3.1-8b --tp-sizes 1,2,4 ||
    step tpc-llama-eager 200 $B/tp_correctness.py --model llama-3.1-8b --tp-sizes 1,2,4 --enforce-eager
  step thr-tp1 100 $B/throughput.py --model llama-3.1-8b --peer none
  step thr-tp2 110 $B/throughput.py --model llama-3.1-8b --peer none --tensor-parallel-size 2
  step thr-tp4 110 $B/throughput.py --model llama-3.1-8b --peer none --tensor-parallel-size 4
  step thr-2groups 120 $B/throughput.py --model llama-3.1-8b --peer none --num-groups 2
  ;;
b)
  for tp in 1 2 4; do
    step lat-tp$tp 90 $B/latency.py --model llama-3.1-8b --peer none --prompt-lens 128 --output-len 128 \
      --max-model-len 4096 --tensor-parallel-size $tp
  done
  step serve-2groups 150 $B/serving.py --model llama-3.1-8b --num-groups 2
  step serve-1group 150 $B/serving.py --model llama-3.1-8b --num-groups 1 --port 8001
  step tpc-qwen 200 $B/tp_correctness.py --model qwen3-8b --tp-sizes 1,2,4
  ;;
c)
  for tp in 1 2 4; do
    step thr-tp$tp 110 $B/throughput.py --model llama-3.1-8b --peer none --tensor-parallel-size $tp
  done
  step thr-2groups 120 $B/throughput.py --model llama-3.1-8b --peer none --num-groups 2
  for tp in 1 2 4; do
    step lat-tp$tp 80 $B/latency.py --model llama-3.1-8b --peer none --prompt-lens 128 --output-len 64 \
      --reps 2 --max-model-len 4096 --tensor-parallel-size $tp
  done
  step serve-2groups 120 $B/serving.py --model llama-3.1-8b --num-groups 2 --num-requests 128 --max-len 512
  step tpc-qwen 120 $B/tp_correctness.py --model qwen3-8b --tp-sizes 1,2,4 --num-prompts 8
  ;;
d)
  step serve-2groups 150 $B/serving.py --model llama-3.1-8b --num-groups 2 --num-requests 128 --max-len 512
  step serve-1group 120 $B/serving.py --model llama-3.1-8b --num-groups 1 --num-requests 128 --max-len 512 --port 8001
  step tpc-qwen 120 $B/tp_correctness.py --model qwen3-8b --tp-sizes 1,2,4 --num-prompts 8
  step tpc-llama 120 $B/tp_correctness.py --model llama-3.1-8b --tp-sizes 1,2,4 --num-prompts 8
  step thr-tp1 60 $B/throughput.py --model llama-3.1-8b --peer none
  step thr-tp2 90 $B/throughput.py --model llama-3.1-8b --peer none --tensor-parallel-size 2
  step thr-2groups 100 $B/throughput.py --model llama-3.1-8b --peer none --num-groups 2
  ;;
e)
  step serve-2groups 130 $B/serving.py --model llama-3.1-8b --num-groups 2 --num-requests 128 --max-len 512
  step serve-1group 110 $B/serving.py --model llama-3.1-8b --num-groups 1 --num-requests 128 --max-len 512 --port 8001
  step tpc-qwen 140 $B/tp_correctness.py --model qwen3-8b --tp-sizes 1,2,4 --num-prompts 8
  step tpc-llama 130 $B/tp_correctness.py --model llama-3.1-8b --tp-sizes 1,2,4 --num-prompts 8
  ;;
f)
  step serve-2groups 120 $B/serving.py --model llama-3.1-8b --num-groups 2 --num-requests 256 --max-len 512
  step serve-1group 100 $B/serving.py --model llama-3.1-8b --num-groups 1 --num-requests 256 --max-len 512 --port 8001
  step thr-2groups-1024 130 $B/throughput.py --model llama-3.1-8b --peer none --num-groups 2 --num-requests 1024
  step thr-tp1-1024 150 $B/throughput.py --model llama-3.1-8b --peer none --num-requests 1024
  ;;
g)
  step serve-2groups 170 $B/serving.py --model llama-3.1-8b --num-groups 2 --num-requests 256 --max-len 512
  step serve-1group 120 $B/serving.py --model llama-3.1-8b --num-groups 1 --num-requests 256 --max-len 512 --port 8001
  ;;
esac
exit 0
