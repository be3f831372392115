#!/bin/bash
# Multi-process training without SLURM: run this once per node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh +experiment=dit_256 strategy=fsdp ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh +experiment=dit_256 strategy=fsdp ...
# On one machine the defaults suffice: launch/torchrun.sh +experiment=demo strategy=ddp
# On CPU (tests, laptops) use NPROC=2 and add trainer=cpu strategy.process_group_backend=gloo.
# Extra arguments are Hydra overrides for train.py. RUN_DIR must be the same on every node and
# across restarts for ckpt_path=auto to resume.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
if [[ "${NPROC}" -lt 1 ]]; then NPROC=1; fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RUN_DIR="${RUN_DIR:-outputs/torchrun/$(date +%Y-%m-%d)}"

exec python -m torch.distributed.run \
    --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${NPROC}" \
    --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT}" \
    train.py trainer.devices="${NPROC}" trainer.num_nodes="${NNODES}" \
    run_dir="${RUN_DIR}" ckpt_path=auto "$@"
