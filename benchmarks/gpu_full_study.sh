#!/usr/bin/env bash
# The whole default study, end to end, on one GPU, for two presets:
#  1. `dvc exp run` of the committed params.yaml (gpt2-small, 12 layers x 5 features x 5 alphas x 200 passages x
#     256 tokens, device auto) on the full-scale hub twin (GPT-2 Small's true shapes, random weights);
#  2. the gemma-2-2b preset's full default study on the real weights (Gemma-2-2B, 26 Gemma Scope width-16k SAEs,
#     all 26 layers x 5 features x 5 alphas x 200 passages x 256 tokens, WikiText-2, Neuronpedia): it needs the
#     network and a Hugging Face token whose account accepted Gemma's licence (`hf auth login`, or HF_TOKEN), and
#     ~40 GB of disk (the hub cache ~18 GB, the processed model and DVC's copy of it ~21 GB); SKIP_GEMMA=1 leaves it out.
# Each with the per-stage breakdown (start + imports, loading, work) and the peak GPU memory of each stage. Both
# studies run the `screen` stage (every feature of every layer estimated, screen_top_k + screen_random features
# per layer verified exactly at every alpha): the breakdown prints its pass and its verification apart, and each
# JSON carries metrics/screen/agreement.json as `screen_agreement` (on the twin's random weights for the first, the
# real weights for the second). 3. The screen against its forward+backward floor on all 12 GPT-2-Small-shaped layers
# (benchmarks/screen_timing.py, 200 x 256 tokens) -> OUT_DIR/screen-timing.json. 4. The engine alone on the full
# shape, layer by layer (`python -m pipeline bench --full --skip-plain`): its time and peak GPU memory without and
# with the default 8 random-direction controls, and in bfloat16 and float16 -> OUT_DIR/bench-full.{log,json}.
#
#   bash benchmarks/gpu_full_study.sh [OUT_DIR]      # from the repository root, requirements installed
#
# Expected: the gpt2-small twin study took under 8 minutes on an H100-class GPU before the screen stage existed
# (about 1 minute of it building the twin); with the screen and its second-order verification (screen_estimator) it
# has not been timed on a GPU yet, nor has the Gemma study (the first run downloads ~18 GB).
# Writes OUT_DIR/gpu.txt (the card), OUT_DIR/full-study.{log,json}, OUT_DIR/screen-timing.json,
# OUT_DIR/bench-full.{log,json} and OUT_DIR/gemma-full-study.{log,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu-$(date +%F)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"; } > "$out/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script measures the GPU'"
start=$(date +%s)
python benchmarks/stage_breakdown.py --scale full --out "$out/full-study.json" 2>&1 | tee "$out/full-study.log"
echo "end to end, twin build included: $(( $(date +%s) - start )) s" | tee -a "$out/full-study.log"
python benchmarks/screen_timing.py --layers all --passages 200 --max-len 256 --batch 8 --device cuda \
  > "$out/screen-timing.json"
python -m pipeline bench --device cuda --full --skip-plain --out "$out/bench-full.json" 2>&1 | tee "$out/bench-full.log"

if [ "${SKIP_GEMMA:-0}" != 1 ]; then
  start=$(date +%s)
  python benchmarks/stage_breakdown.py --preset gemma-2-2b --real --out "$out/gemma-full-study.json" \
    2>&1 | tee "$out/gemma-full-study.log"  # params.yaml's null `layers`: all 26
  echo "gemma-2-2b end to end, downloads included: $(( $(date +%s) - start )) s" | tee -a "$out/gemma-full-study.log"
fi
