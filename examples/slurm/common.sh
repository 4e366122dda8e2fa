# Sourced by the sbatch scripts: cluster environment, rendezvous, and the node/GPU arithmetic check.
# Site specifics (modules, container, venv) go in SOAES_ENV_SETUP, e.g. "source /opt/venvs/soaes/bin/activate".
set -euo pipefail
eval "${SOAES_ENV_SETUP:-}"
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1          # needed for TP/SP communication overlap
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
WORLD=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))

# check_layout CONFIG: validate the job config against the world size before any GPU work
# (TP*PP*CP must divide the world, the global batch must split over micro-batches x data-parallel).
check_layout() {
  soaes train --config "$1" --dry-run --world-size "$WORLD" "${@:2}"
}

# launch ARGS...: one task per GPU; megatron-soaes reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.
launch() {
  srun --kill-on-bad-exit=1 --cpu-bind=none "$@"
}

# launch_resumable ARGS...: launch a training job; exit status 75 (EXIT_PREEMPTED: the trainer got
# SIGTERM from --signal, saved at its current step and exited) requeues this job, which then resumes
# from that checkpoint. Any other failure is the job's exit status.
# srun must not kill the other ranks when the first one exits 75: each saves, then exits 75 on its own.
launch_resumable() {
  local rc=0
  srun --kill-on-bad-exit=0 --cpu-bind=none "$@" || rc=$?
  if [ "$rc" -eq 75 ]; then
    echo "preempted: checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}
