#!/usr/bin/env bash
# Launch the training job on this node with torchrun.
#   NPROC=8 bash scripts/torchrun.sh model=llama3_8b model.dense_checkpoint=/ckpts/llama3-8b \
#       moe=e8t2 moe.capacity_factor=4 parallel.tp=2 parallel.ep=4 parallel.sp=true
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l )}
[ "$NPROC" -gt 0 ] || NPROC=2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run \
  --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m nemo_upcycle.train "$@"
