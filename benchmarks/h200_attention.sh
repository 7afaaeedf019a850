#!/usr/bin/env bash
# The attention backends on one H200 (the device tool), from the project root, on a machine where
# .gpu/unpack.sh has run (Ray is only needed by the serving part l1). Carry .gpu/attn/flashinfer (the
# flashinfer-python wheel; benchmarks/ATTENTION_INSTALL.md says how it was downloaded) and, when an
# earlier call left one, .gpu/fi-cache.tgz (FlashInfer's JIT cache), then:
#   export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/h200_attention.sh PARTS
# PARTS (default: fi ab):
#   fi  the GPU tests of the attention backends for triton, flashinfer and auto (FlashInfer compiles
#       each kernel variant with nvcc on first use); its JIT cache is then packed into $OUT/fi-cache.tgz
#   ab  benchmarks/attention.py --quick: triton beside flashinfer per operation
#   abf the full sweep
#   tp  benchmarks/throughput.py, Llama-3.1-8B offline, triton then flashinfer then auto
#   l1  benchmarks/serving.py, Llama-3.1-8B over HTTP with attention_backend=flashinfer
# FlashInfer is installed into /tmp/fi (its own target, first on the path: never --upgrade into
# /tmp/site, see ../shared/hooks/DEVICE.md); apache-tvm-ffi comes with .gpu/whl.
parts=${*:-fi ab}
log=$OUT/attention.log
. "$(dirname "$0")/h200_run.sh"
if [ ! -d /tmp/fi/flashinfer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fi .gpu/attn/flashinfer/*.whl >> "$log" 2>&1
fi
export PYTHONPATH=/tmp/fi:$PYTHONPATH
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-ws FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
if [ -f .gpu/fi-cache.tgz ] && [ ! -d /tmp/fi-ws ]; then mkdir -p /tmp/fi-ws && tar -xzf .gpu/fi-cache.tgz -C /tmp/fi-ws; fi
python3 -c "import flashinfer; print('== flashinfer', flashinfer.__version__)" >> "$log" 2>&1
pack_cache() {
  [ -d /tmp/fi-ws ] && tar -czf "$OUT/fi-cache.tgz" -C /tmp/fi-ws . && ls -la "$OUT/fi-cache.tgz" >> "$log"
}
for p in $parts; do
  case $p in
    fi) run fi 400 python3 -m pytest -q -x -p no:cacheprovider --durations 15 tests/gpu/test_attention_backends_gpu.py \
            -k "triton or flashinfer or auto"
        pack_cache ;;
    ab) run ab 120 python3 benchmarks/attention.py --quick --backends triton,flashinfer ;;
    abf) run abf 300 python3 benchmarks/attention.py --backends triton,flashinfer ;;
    tp) for b in triton flashinfer auto; do
          run "tp-$b" 150 python3 benchmarks/throughput.py --model llama-3.1-8b --peer none --attention-backend $b \
              --tag "h200-attention-$b"
        done ;;
    l1) run l1 200 python3 benchmarks/serving.py --model llama-3.1-8b --num-groups 1 --tag h200-flashinfer \
            --open-loop-fraction 0 --engine-arg attention_backend=flashinfer ;;
  esac
done
pack_cache
grep -h "^== \|passed\|failed\|error\|output tok/s\|us \| ms " "$log" | tail -80
