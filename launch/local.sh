#!/usr/bin/env bash
# One node with torchrun: bash launch/local.sh NPROC CONFIG [key=value overrides]
# The layout (TP, PP, CP) comes from the config; DP is what is left of NPROC.
#
# Signals: SIGUSR1 and SIGTERM are forwarded to the ranks (the trainer finishes its step, saves and
# exits), not to torchrun, which would otherwise die of SIGUSR1 or kill the ranks mid-save. If this
# script or torchrun is killed outright, the ranks exit too (torchrun under setpriv --pdeathsig,
# the ranks through their own launcher watchdog), so no orphan keeps training.
set -euo pipefail
nproc=${1:?usage: launch/local.sh NPROC CONFIG [overrides]}
config=${2:?usage: launch/local.sh NPROC CONFIG [overrides]}
shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

cmd=(torchrun --standalone --nproc-per-node "$nproc" -m megatron_longact.cli.train --config "$config" "$@")
if command -v setpriv >/dev/null 2>&1 && setpriv --help 2>&1 | grep -q -- --pdeathsig; then
  cmd=(setpriv --pdeathsig KILL "${cmd[@]}")
fi

forward() {
  local sig=$1 pids
  pids=$(pgrep -P "$launcher" -f megatron_longact.cli.train || true)
  echo "local.sh: forwarding SIG$sig to ranks ${pids//$'\n'/ }" >&2
  if [[ -n $pids ]]; then
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
  fi
}

"${cmd[@]}" &
launcher=$!
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# wait returns early when a trapped signal arrives: keep waiting for torchrun itself.
status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  if ! kill -0 "$launcher" 2>/dev/null; then
    break
  fi
done
exit "$status"
