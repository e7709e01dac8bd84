#!/usr/bin/env bash
# Build the isolated circuit-tracer reference environment (idempotent).
#
# circuit-tracer 0.5.0 pins transformers<=4.57.3 and huggingface-hub<1.0, which the service's
# environment (transformers 5.16-5.19) cannot hold, so it lives in its own venv. torch comes
# from the same wheel as the service (pip finds it through the machine's find-links).
#
# Usage: tests/reference/build_env.sh [VENV_DIR]
# Default VENV_DIR: ${FEATURESTEER_CACHE_DIR:-~/.cache/featuresteer}/ct-venv
set -euo pipefail
CACHE="${FEATURESTEER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/featuresteer}"
VENV="${1:-$CACHE/ct-venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.featuresteer-ct-0.5.0"
if [[ -f "$STAMP" ]]; then
  echo "reference env ready: $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "transformers<=4.57.3" "huggingface-hub<1.0" \
  "circuit-tracer==0.5.0" psutil
"$VENV/bin/python" -c "import circuit_tracer, transformers, torch; print('circuit-tracer ok', transformers.__version__, torch.__version__)"
touch "$STAMP"
echo "reference env ready: $VENV"
