#!/usr/bin/env bash
# The serving runs on one H200 (the device tool), in one call, from the project root (.gpu/unpack.sh
# installs .gpu/whl, which has py-spy for the engine core's profiles; xgrammar is not needed here):
#   bash .gpu/unpack.sh && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/h200_serving.sh PARTS
# PARTS (default all): q1 (Qwen3-0.6B, one group), l1 (Llama-3.1-8B, one group), q2 (Qwen3-0.6B,
# two groups sharing the GPU), hs (host scaling with the stand-in model on the machine's CPUs), st (where
# the serving path's start-up goes, benchmarks/startup.py: run it first on a fresh machine, cold caches;
# also in benchmarks/h200_features.sh, with the feature benchmarks; the engine core phases line
# splits its build: before_load_s, load_s, profile_s, the graphs, after_graphs_s), sw (st again, with the kernel
# caches st left).
# Results and logs go to $OUT; each run is bounded and leaves no Ray processes behind.
parts=${*:-q1 l1 q2 hs}
log=$OUT/serving.log
. "$(dirname "$0")/h200_run.sh"
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
    st) run st 150 python3 benchmarks/startup.py --model qwen3-0.6b --tag h200 ;;
    # ... and again after st, with the Triton and CUDA kernel caches it left.
    sw) run sw 150 python3 benchmarks/startup.py --model qwen3-0.6b --tag h200-warm-caches ;;
    hs) run hs 240 python3 benchmarks/host_scaling.py --groups 1,2,4,8 --step-ms 25 --concurrency-per-group 256 \
            --requests-per-group 512 --output-len 256 --api-server-count 8 --client-procs 8 --tag h200-cpus ;;
  esac
done
grep -h "^== \|output tok/s\|process start\|G=\|longest\| s  \|engine core phases" "$log"
