#!/bin/bash
# Sourced by the sbatch scripts (batch shell) to derive the distributed settings from the SLURM
# allocation. Every srun task inherits them; Lightning's SLURMEnvironment reads the per-task
# ranks (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID) itself.
#
# Sets: MASTER_ADDR (first node of the allocation), MASTER_PORT (fixed per job, so a requeued job
# and all its tasks agree), RUN_DIR (fixed per job id: the requeued job finds its checkpoints),
# NCCL / thread settings, SRUN_CPUS_PER_TASK.

# Rank 0 lives on the first node of the allocation. `sed -n 1p` reads every line: `head -n 1`
# closes the pipe early, and under `set -o pipefail` scontrol's SIGPIPE (exit 141) killed the job.
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}" | sed -n 1p)"
export MASTER_ADDR
# A port in 20000-29999 derived from the job id: distinct for jobs sharing a node, stable across requeues.
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:?} % 10000))}"

# Array jobs requeue per task; their run directory is keyed by array job and task.
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    JOB_KEY="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
    JOB_KEY="${SLURM_JOB_ID}"
fi
export RUN_DIR="${RUN_DIR:-outputs/${NAME:-${SLURM_JOB_NAME:-run}}/${JOB_KEY}}"

# NCCL: fail fast on a hung collective instead of hanging until the time limit (the job is then
# requeued and resumes from the last checkpoint); keep logs short unless debugging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric if NCCL picks the wrong interface.

# One intra-op thread pool per task, sized to the CPUs SLURM gave it.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch. The scripts pass it to srun,
# and SRUN_CPUS_PER_TASK covers any other srun in the job (a debugging shell, a helper step).
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
