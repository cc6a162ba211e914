#!/usr/bin/env bash
# Create a fresh virtual environment (CPU build of torch), install the package and run the CPU demo.
# Usage: bash launch/demo_cpu.sh [key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m venv --clear .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "torch==2.13.0" -e .
# The demo is a CPU run by design, also on a machine that has GPUs.
export MEGATRON_LONGACT_CPU=1
exec .venv/bin/longact-train --config configs/demo_cpu.yaml "$@"
