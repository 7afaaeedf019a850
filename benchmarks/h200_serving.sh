#!/usr/bin/env bash
# The serving runs on one H200 (the device tool), in one call, from the project root (.gpu/unpack.sh
# installs .gpu/whl, which has py-spy for the engine core's profiles; xgrammar is not needed here):
#   bash .gpu/unpack.sh && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/h200_serving.sh PARTS
# PARTS (default all): q1 (Qwen3-0.6B, one group), l1 (Llama-3.1-8B, one group), q2 (Qwen3-0.6B,
# two groups sharing the GPU), hs (host scaling with the stand-in model on the machine's CPUs; hs4,
# hs14 and hs8 its bounded pieces: groups 1,2,4, 1,4 and 1,8), st (where
# the serving path's start-up goes, benchmarks/startup.py: run it first on a fresh machine, cold caches;
# also in benchmarks/h200_features.sh, with the feature benchmarks; the engine core phases line
# splits its build: before_load_s, load_s, profile_s, the graphs, after_graphs_s), sw (st again, with the kernel
# caches st left).
# Results and logs go to $OUT; each run is bounded and leaves no Ray processes behind.
# The ingress needs uvloop and httptools (the C parts of uvicorn[standard], which a user's
# `pip install raylm` gets through ray[serve]): without httptools uvicorn parses HTTP with the
# pure-Python h11, and every streamed token costs the ingress more CPU. The image has uvloop but not
# httptools, and the pack carried plain uvicorn, so the runs before 2026-12-06 most likely used h11;
# the pack now carries httptools, each result records its "http_stack", and the log's first line
# says which it was.
parts=${*:-q1 l1 q2 hs}
log=$OUT/serving.log
. "$(dirname "$0")/h200_run.sh"
echo "== http stack: $(python3 -c 'import uvloop, httptools; print("uvloop", uvloop.__version__, "httptools", httptools.__version__)' 2>&1 | tail -1)" >> "$log"
profile() {  # after $1 s, 8 s of py-spy on the engine core process -> $OUT/$2
  (sleep "$1"; pid=$(pgrep -f "ray::EngineCoreActor" | head -1)
   [ -n "$pid" ] && py-spy record -d 8 -r 100 -p "$pid" -f raw -o "$OUT/$2" > /dev/null 2>&1) &
}
for p in $parts; do
  case $p in
    q1) profile 75 prof-qwen-core.txt
        run q1 200 python3 benchmarks/serving.py --model qwen3-0.6b --num-groups 1 --tag h200-direct ;;
    l1) profile 80 prof-llama-core.txt
        run l1 200 python3 benchmarks/serving.py --model llama-3.1-8b --num-groups 1 --tag h200-direct \
            --open-loop-fraction 0 ;;
    q2) run q2 200 python3 benchmarks/serving.py --model qwen3-0.6b --num-groups 2 --num-gpus-per-worker 0.5 \
            --api-server-count 4 --tag h200-shared-gpu --open-loop-fraction 0 ;;
    # st first compiles the carried packages' bytecode (unpack.sh installs them with --no-compile, which
    # a user's `pip install` does not do), so the cold start measures what a fresh install would.
    st) t0=$(date +%s.%N); python3 -m compileall -q -j 16 /tmp/site raylm > /dev/null 2>&1
        echo "== st: bytecode of /tmp/site and raylm compiled in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" >> "$log"
        run st 150 python3 benchmarks/startup.py --model qwen3-0.6b --tag "$gpu" ;;
    # ... and again after st, with the Triton and CUDA kernel caches it left.
    sw) run sw 150 python3 benchmarks/startup.py --model qwen3-0.6b --tag "$gpu-warm-caches" ;;
    # q2 again under MPS (the CUDA MPS control daemon, started here as this user and stopped after the
    # run; the GPU's settings are left as they are), so two processes' kernels share the GPU at once.
    q2m) export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
         mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
         if nvidia-cuda-mps-control -d >> "$log" 2>&1 && timeout 60 python3 -c \
              "import torch; torch.ones(1, device='cuda').sum().item(); print('== mps client ok')" >> "$log" 2>&1; then
           run q2m 200 python3 benchmarks/serving.py --model qwen3-0.6b --num-groups 2 --num-gpus-per-worker 0.5 \
               --api-server-count 4 --tag h200-shared-gpu-mps --open-loop-fraction 0
         else echo "== q2m: MPS did not start" >> "$log"; cat $CUDA_MPS_LOG_DIRECTORY/* >> "$log" 2>&1; fi
         echo quit | nvidia-cuda-mps-control >> "$log" 2>&1
         unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY ;;
    # hs split in two bounded runs: 1, 2 and 4 groups, then 1 and 8.
    hs4) run hs4 200 python3 benchmarks/host_scaling.py --groups 1,2,4 --step-ms 25 --concurrency-per-group 256 \
            --requests-per-group 512 --output-len 256 --api-server-count 8 --client-procs 8 --tag h200-cpus ;;
    hs14) run hs14 200 python3 benchmarks/host_scaling.py --groups 1,4 --step-ms 25 --concurrency-per-group 256 \
            --requests-per-group 512 --output-len 256 --api-server-count 8 --client-procs 8 --tag cpus-g4 ;;
    hs8) run hs8 270 python3 benchmarks/host_scaling.py --groups 1,8 --step-ms 25 --concurrency-per-group 256 \
            --requests-per-group 512 --output-len 256 --api-server-count 8 --client-procs 8 --tag h200-cpus-g8 ;;
    hs) run hs 240 python3 benchmarks/host_scaling.py --groups 1,2,4,8 --step-ms 25 --concurrency-per-group 256 \
            --requests-per-group 512 --output-len 256 --api-server-count 8 --client-procs 8 --tag h200-cpus ;;
  esac
done
grep -h "^== \|output tok/s\|process start\|G=\|longest\| s  \|engine core phases" "$log"
