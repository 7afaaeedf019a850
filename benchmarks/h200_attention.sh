#!/usr/bin/env bash
# The attention backends on one H200 or H100 (the device tool), from the project root.
#   export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/h200_attention.sh PARTS
# What each call carries (64 MiB a call with the working tree, so FlashAttention-4's packed
# CUDA 13 library comes in two calls back to back; the machine keeps /tmp while it is warm):
#   call 1: .gpu/attn/fa4 (FA4's wheels, apache-tvm-ffi, part 00 of the library) and
#           .gpu/attn/flashinfer; PARTS "stash" copies them to /tmp/attn and installs FlashInfer
#   call 2: .gpu/attn/fa4-part2 (part 01) and .gpu/fi-cache.tgz (FlashInfer's JIT cache from an
#           earlier call); PARTS "fa4" joins the parts, checks them and installs FA4, then e.g.
#           "fi fa ab3"
# benchmarks/ATTENTION_INSTALL.md says how the files were made. PARTS:
#   stash  copy the carried wheels and parts to /tmp/attn; install FlashInfer
#   fa4    join and install FlashAttention-4 (needs both parts in /tmp/attn)
#   fi     the kernel GPU tests of triton, flashinfer and auto (FlashInfer compiles each kernel
#          variant with nvcc on first use); its JIT cache is then packed into $OUT/fi-cache.tgz
#          (with the engine tests too it outran 330 s on a fresh H100 machine, twice, on 12-06)
#   fie    the engine tests alone of flashinfer and auto (greedy output and logprobs against Triton's)
#   fa     the GPU tests of flash_attn (FA4's CuTe DSL compiles its kernels on first use)
#   ab     benchmarks/attention.py --quick: triton beside flashinfer per operation
#   abf    the full sweep, triton and flashinfer;  ab3  the full sweep of all three
#   tp     benchmarks/throughput.py offline, Llama-3.1-8B then Qwen3-0.6B, each backend in turn
#   lat    benchmarks/latency.py (batch 1), Llama-3.1-8B, triton then auto
#   l32    the same at 1k and 32k-token prompts, triton, flashinfer and auto
#   ab128  the full sweep of all three at block size 128 (FA4 reads pages by TMA only there)
#   tpl    benchmarks/throughput.py offline, Llama-3.1-8B, triton and auto alternating, twice
#   l1     benchmarks/serving.py, Llama-3.1-8B over HTTP with attention_backend=flashinfer
#   smp    the sampler's GPU tests (its sort-free top-k / top-p kernel) and benchmarks/sampling.py,
#          which times FlashInfer's sampling kernels beside ours
#   smpt   the sampler's GPU tests alone;  sb  sampling.py alone, with a longer bound (FlashInfer's
#          sampling module compiles on first use unless the carried JIT cache has it)
#   topp   Llama-3.1-8B offline, auto, top_p 1 then 0.9 (FlashInfer draws where installed)
#   tpa    benchmarks/throughput.py offline with attention_backend=auto, both models, then
#          Llama-3.1-8B with top_p 0.9 (its Instruct generation config) beside it
# FlashInfer goes to /tmp/fi and FA4 to /tmp/fa4 (own targets, first on the path: never
# --upgrade into /tmp/site, see ../shared/hooks/DEVICE.md).
parts=${*:-fi ab}
log=$OUT/attention.log
. "$(dirname "$0")/h200_run.sh"
install_fi() {
  [ -d /tmp/fi/flashinfer ] && return
  local w=(.gpu/attn/flashinfer/*.whl); [ -f "${w[0]}" ] || w=(/tmp/attn/flashinfer_python-*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fi "${w[@]}" \
    $(ls .gpu/attn/fa4/apache_tvm_ffi-*.whl .gpu/whl2/apache_tvm_ffi-*.whl /tmp/attn/apache_tvm_ffi-*.whl 2>/dev/null | head -1) >> "$log" 2>&1
}
install_fa4() {
  [ -d /tmp/fa4/flash_attn ] && return
  cp .gpu/attn/fa4-part2/* /tmp/attn/ 2>/dev/null
  (cd /tmp/attn && cat nvidia_cutlass_dsl_libs_cu13-4.8.1.tar.xz.part-* > cu13.tar.xz \
     && sha256sum -c cu13.sha256) >> "$log" 2>&1 || { echo "== fa4: parts missing or bad" >> "$log"; return; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4 \
    $(ls /tmp/attn/*.whl | grep -v flashinfer) >> "$log" 2>&1
  tar -xJf /tmp/attn/cu13.tar.xz -C /tmp/fa4 && rm -f /tmp/attn/cu13.tar.xz
}
[ -d .gpu/attn/flashinfer ] && install_fi
# --target does not run the .pth that puts the CuTe DSL's packages on the path.
export PYTHONPATH=/tmp/fi:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4-cache
# A carried JIT cache is merged into the machine's (importing a package may have made its
# folder already, empty).
if [ -f .gpu/fa4-cache.tgz ]; then mkdir -p /tmp/fa4-cache && tar -xzf .gpu/fa4-cache.tgz -C /tmp/fa4-cache; fi
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-ws FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
if [ -f .gpu/fi-cache.tgz ]; then mkdir -p /tmp/fi-ws && tar -xzf .gpu/fi-cache.tgz -C /tmp/fi-ws; fi
python3 -c "import flashinfer; print('== flashinfer', flashinfer.__version__)" >> "$log" 2>&1
pack_cache() {
  [ -d /tmp/fi-ws ] && tar -czf "$OUT/fi-cache.tgz" -C /tmp/fi-ws . && ls -la "$OUT/fi-cache.tgz" >> "$log"
  [ -d /tmp/fa4-cache ] && tar -czf "$OUT/fa4-cache.tgz" -C /tmp/fa4-cache . && ls -la "$OUT/fa4-cache.tgz" >> "$log"
  return 0
}
for p in $parts; do
  case $p in
    stash) mkdir -p /tmp/attn && cp .gpu/attn/fa4/* .gpu/attn/flashinfer/* /tmp/attn/ && install_fi
           ls -la /tmp/attn >> "$log" ;;
    fa4) install_fa4
         python3 -c "import flash_attn.cute.interface as f; print('== fa4 imported', f.__file__)" >> "$log" 2>&1 ;;
    fa) run fa 300 python3 -m pytest -q --maxfail=12 -p no:cacheprovider --durations 15 tests/gpu/test_attention_backends_gpu.py \
            -k "flash_attn"
        pack_cache ;;
    ab3) run ab3 240 python3 benchmarks/attention.py --backends triton,flashinfer,flash_attn ;;
    fi) run fi 330 python3 -m pytest -q --maxfail=12 -p no:cacheprovider --durations 15 tests/gpu/test_attention_backends_gpu.py \
            -k "(triton or flashinfer or auto) and not engine"
        pack_cache ;;
    fie) run fie 330 python3 -m pytest -q -p no:cacheprovider --durations 15 tests/gpu/test_attention_backends_gpu.py \
             -k "engine and (flashinfer or auto)"
         pack_cache ;;
    ab) run ab 150 python3 benchmarks/attention.py --quick --backends triton,flashinfer ;;
    abf) run abf 200 python3 benchmarks/attention.py --backends triton,flashinfer ;;
    tp) for m in llama-3.1-8b qwen3-0.6b; do
          for b in triton flashinfer flash_attn auto; do
            run "tp-$m-$b" 150 python3 benchmarks/throughput.py --model $m --peer none --attention-backend $b \
                --tag "attention-$b"
          done
        done ;;
    l32) for b in triton flashinfer auto; do
           run "l32-$b" 240 python3 benchmarks/latency.py --model llama-3.1-8b --peer none --prompt-lens 1024,32768 \
               --max-model-len 33792 --output-len 64 --attention-backend $b
         done ;;
    ab128) run ab128 240 python3 benchmarks/attention.py --backends triton,flashinfer,flash_attn --block-size 128 ;;
    tpl) for i in 1 2; do
           for b in triton auto; do
             run "tpl-$b-$i" 150 python3 benchmarks/throughput.py --model llama-3.1-8b --peer none \
                 --attention-backend $b --tag "attention-$b-$i"
           done
         done ;;
    lat) for b in triton auto; do
           run "lat-$b" 150 python3 benchmarks/latency.py --model llama-3.1-8b --attention-backend $b
         done ;;
    smp) run smp 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sampler_gpu.py
         run sampling 200 python3 benchmarks/sampling.py ;;
    smpt) run smpt 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sampler_gpu.py ;;
    sb) run sampling 480 python3 benchmarks/sampling.py ;;
    topp) for p in 1.0 0.9; do
            run "topp-$p" 150 python3 benchmarks/throughput.py --model llama-3.1-8b --peer none \
                --attention-backend auto --top-p $p --tag "attention-auto-top-p-$p-flashinfer-sampler"
          done ;;
    tpa) for m in llama-3.1-8b qwen3-0.6b; do
           run "tpa-$m" 150 python3 benchmarks/throughput.py --model $m --peer none --attention-backend auto \
               --tag attention-auto
         done
         run tpa-topp 150 python3 benchmarks/throughput.py --model llama-3.1-8b --peer none --attention-backend auto \
             --top-p 0.9 --tag attention-auto-top-p ;;
    l1) run l1 200 python3 benchmarks/serving.py --model llama-3.1-8b --num-groups 1 --tag h200-flashinfer \
            --open-loop-fraction 0 --engine-arg attention_backend=flashinfer ;;
  esac
done
pack_cache
grep -h "^== \|passed\|failed\|error\|output tok/s\|us \| ms " "$log" | tail -80
