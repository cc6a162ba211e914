# shellcheck shell=bash
# Shared body of the sbatch scripts in this folder; they set CONFIG and PLAN_ARGS (an array of
# extra longact-plan options, possibly empty) and source this file from the repository root (sbatch runs a copy of the script, so the root
# comes from SLURM_SUBMIT_DIR: submit from the repository root, or set LONGACT_ROOT).
#
# What it does, on the batch host:
#   1. the run folder runs/<job name>/ (override: RUN_DIR) with logs/ for per-node logs; the
#      trainer writes its config, TensorBoard events (tb/) and checkpoints under it (output.dir);
#   2. rendezvous: the first node of the allocation hosts torchrun's c10d store;
#   3. NCCL and CUDA environment (site-specific values can be set before sbatch: they are kept);
#   4. preflight: longact-plan checks the layout against this allocation and the memory estimate
#      against the GPUs, and stops the job before any GPU work if either fails;
#   5. srun starts one torchrun per node, which starts one trainer process per GPU;
#   6. preemption: SIGUSR1 (sent --signal=B:USR1@<s> seconds before the time limit) creates the
#      stop file $LONGACT_STOP_FILE; the trainer saves a checkpoint and exits, then the job is
#      requeued with scontrol; SIGTERM (preemption, scancel) is passed on to srun. A requeued job keeps
#      its id and name, so it comes back to the same run folder, and the trainer resumes from the
#      latest complete checkpoint in output.dir (checkpoints are published by an atomic rename, so
#      a kill during a save leaves the previous one intact).
#
# Arguments given to sbatch after the script name are dotted config overrides, passed to both the
# planner and the trainer:  sbatch launch/slurm/qwen3_8b_grpo_1node.sbatch train.steps=100

set -euo pipefail

: "${CONFIG:?the sbatch script sets CONFIG}"
: "${SLURM_JOB_ID:?run this under sbatch}"
# shellcheck disable=SC2154  # PLAN_ARGS is set by the sbatch script
PLAN=("${PLAN_ARGS[@]}")
OVERRIDES=("$@")
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RESTART=${SLURM_RESTART_COUNT:-0}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-longact}}
LOG_DIR=$RUN_DIR/logs
mkdir -p "$LOG_DIR"

# --- rendezvous -------------------------------------------------------------------------------
# (No `| head -n 1`: under pipefail, scontrol killed by SIGPIPE would fail the job.)
HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
MASTER_ADDR=${HOSTS%%$'\n'*}
# A port derived from the job id: two jobs sharing a first node do not collide.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# --- environment ------------------------------------------------------------------------------
# Megatron needs one CUDA work queue per device so that its tensor-parallel communication kernels
# are scheduled in issue order and overlap with compute.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# InfiniBand: a longer timeout rides out transient link flaps on large jobs.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-10}
# Bootstrap over a real interface, not loopback or container bridges. Site-specific: set
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA (e.g. mlx5) before sbatch where the defaults do not fit.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
if [[ -n ${NCCL_IB_HCA:-} ]]; then export NCCL_IB_HCA; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

echo "$(date -Is) job $SLURM_JOB_ID (restart $RESTART): $NNODES nodes x $GPUS_PER_NODE GPUs," \
     "config $CONFIG, run folder $RUN_DIR, rendezvous $MASTER_ADDR:$MASTER_PORT"

# --- preflight --------------------------------------------------------------------------------
"$PYTHON" -m megatron_longact.cli.plan --config "$CONFIG" --nodes "$NNODES" \
    --gpus-per-node "$GPUS_PER_NODE" "${PLAN[@]}" "${OVERRIDES[@]}" \
    | tee "$LOG_DIR/plan-$SLURM_JOB_ID-r$RESTART.txt"

# --- launch -----------------------------------------------------------------------------------
# Extra srun options (a container image, mounts): SRUN_EXTRA_ARGS="--container-image=..."
read -r -a SRUN_EXTRA <<< "${SRUN_EXTRA_ARGS:-}"

SIGNALLED=0
REQUEUE=0
SRUN_PID=""
# The trainer stops (checkpoint, exit 0) when this file appears: torchrun does not pass SIGUSR1 on
# to its workers, and SIGTERM reaches them only with torchrun's short kill grace period.
export LONGACT_STOP_FILE="$RUN_DIR/.stop-$SLURM_JOB_ID"
rm -f "$LONGACT_STOP_FILE"
# shellcheck disable=SC2317  # trap handler, called indirectly
on_usr1() {
    SIGNALLED=1
    REQUEUE=1
    echo "$(date -Is) SIGUSR1: time limit near; asking the trainer to save ($LONGACT_STOP_FILE)," \
         "then requeueing job $SLURM_JOB_ID"
    touch "$LONGACT_STOP_FILE"
}
# shellcheck disable=SC2317  # trap handler, called indirectly
on_term() {
    SIGNALLED=1
    echo "$(date -Is) SIGTERM: stopping the job step"
    if [[ -n $SRUN_PID ]]; then kill -TERM "$SRUN_PID" 2>/dev/null || true; fi
}
trap on_usr1 USR1
trap on_term TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append \
    --output="$LOG_DIR/$SLURM_JOB_ID-r$RESTART-node%n.log" "${SRUN_EXTRA[@]}" \
    "$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
        --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
        --max-restarts=0 \
        -m megatron_longact.cli.train --config "$CONFIG" "output.dir=$RUN_DIR" "${OVERRIDES[@]}" &
SRUN_PID=$!

# A trapped signal interrupts `wait`; wait again until srun itself has exited.
while :; do
    SIGNALLED=0
    rc=0
    wait "$SRUN_PID" || rc=$?
    [[ $SIGNALLED == 1 ]] || break
done
echo "$(date -Is) job step exited with status $rc"
rm -f "$LONGACT_STOP_FILE"
if [[ $REQUEUE == 1 ]]; then
    # After the trainer's checkpoint is published: the requeued job resumes from it.
    echo "$(date -Is) requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
