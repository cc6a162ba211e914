#!/usr/bin/env bash
# One node with torchrun: bash launch/local.sh NPROC CONFIG [key=value overrides]
# The layout (TP, PP, CP) comes from the config; DP is what is left of NPROC.
set -euo pipefail
nproc=${1:?usage: launch/local.sh NPROC CONFIG [overrides]}
config=${2:?usage: launch/local.sh NPROC CONFIG [overrides]}
shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" -m megatron_longact.cli.train --config "$config" "$@"
