#!/usr/bin/env bash
# The whole default study, end to end, on one GPU: `dvc exp run` of the committed params.yaml
# (gpt2-small, 12 layers x 5 features x 5 alphas x 200 passages x 256 tokens, device auto) on the
# full-scale hub twin (GPT-2 Small's true shapes, random weights), with the per-stage breakdown
# (start + imports, loading, work) and the peak GPU memory of each stage.
#
#   bash benchmarks/gpu_full_study.sh [OUT_DIR]      # from the repository root, requirements installed
#
# Expected: well under 8 minutes on an H100-class GPU (about 1 minute of it building the twin).
# Writes OUT_DIR/gpu.txt (the card), OUT_DIR/full-study.log and OUT_DIR/full-study.json.
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
