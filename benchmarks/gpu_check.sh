#!/usr/bin/env bash
# GPU check for a box with one H100/H200, PyTorch + CUDA, Python 3.12, no vLLM, no network.
# Runs benchmarks/gpu_check.py (intervention math, hooked-engine edits, HF baselines on a
# random SmolLM2-shaped model) under a hard 8-minute limit; results in $OUT (default
# ./gpu_results): gpu_check.json and gpu_check.md. Usage: benchmarks/gpu_check.sh [--device cpu --quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-gpu_results}
mkdir -p "$OUT_DIR"
"$PY" - <<'PY' || { echo "missing: torch and transformers are required" >&2; exit 2; }
import torch, transformers, safetensors
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
# the service package from this checkout (the GPU box does not pip-install it)
PYTHONPATH="service${PYTHONPATH:+:$PYTHONPATH}" timeout 480 "$PY" -m benchmarks.gpu_check \
  --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
