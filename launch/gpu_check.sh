#!/usr/bin/env bash
# GPU acceptance check: NCCL, the RL trainer with LongAct at TP=1 and TP=#GPUs (frozen rows
# bit-identical on CUDA), statistics and optimizer overhead at a realistic size, generation
# tokens/s, and the Transformer Engine spec plus one FP8 step when TE is installed. Prints a table;
# exits 1 without running anything when there is no CUDA. About 3 minutes on one H200 (no TE).
# Usage: bash launch/gpu_check.sh [--gpus N] [--steps 3] [--seq 8192] [--only a,b] [--skip a,b]
#                                 [--log-dir DIR]  (each worker's whole output, for a failure)
# Needs the package installed with a CUDA build of torch (PYTHON picks the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import megatron_longact" 2>/dev/null; then
  echo "gpu_check: $PY cannot import megatron_longact; install it first (pip install -e .)" >&2
  exit 1
fi
exec "$PY" -m megatron_longact.gpu_check "$@"
