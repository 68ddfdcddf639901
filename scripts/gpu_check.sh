#!/usr/bin/env bash
# Every GPU check in one command (scripts/gpu_check.py says what each section measures):
#
#   bash scripts/gpu_check.sh [OUT_DIR] [extra gpu_check.py arguments, e.g. --budget-s 420]
#   bash scripts/gpu_check.sh /tmp/gpu_check --dry      # any machine: tiny shapes (tested in CI)
#
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (default OUT_DIR: gpu_check/) and
# prints the table last. Needs the project installed (`pip install -e .`, README) and a CUDA JAX
# for the GPU; nothing is downloaded: on a machine without network, with a preinstalled CUDA JAX,
# `pip install --no-deps -e .` or this script's own PYTHONPATH fallback is enough.
# Budget: the sections stop being started after --budget-s seconds (450 by default), so the
# whole command stays under 8 minutes on one H100 / H200 (compilations dominate).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-gpu_check}"
shift || true
# The repository itself on the path, in case the package is not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Allocate device memory on demand, so that the peak-memory figures are the program's own and the
# largest-batch estimate sees the whole device.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" --out "$OUT" "$@"
