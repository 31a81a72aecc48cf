#!/usr/bin/env bash
# Launch the training job on this node with torchrun.
#   NPROC=8 bash scripts/torchrun.sh model=llama3_8b model.dense_checkpoint=/ckpts/llama3-8b \
#       moe=e8t2 moe.capacity_factor=4 parallel.tp=2 parallel.ep=4 parallel.sp=true
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node.
#
# The rendezvous port (nemo_upcycle/platform/launcher_env.py: rendezvous_port): MASTER_PORT
# when set; else, inside a Slurm job, 20000 + SLURM_JOB_ID % 20000; else a port that is free
# now. Never a fixed one: two jobs on one node on the same port join each other's rendezvous.
# Preemption (nemo_upcycle/training/preemption.py): torchrun forwards SIGTERM and, asked to,
# SIGUSR1 to every rank, which then finish the step, save one checkpoint and exit 75; it
# kills ranks still running SHUTDOWN_TIMEOUT seconds after forwarding (default 30 s: too
# short for a large model's save), so that is raised to 600 s here.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l )}
[ "$NPROC" -gt 0 ] || NPROC=2
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_PORT:-}" ] && [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: NNODES=$NNODES needs the same MASTER_PORT (and MASTER_ADDR) set on every node" >&2
  exit 2
fi
PORT=$("$PY" -m nemo_upcycle.cli.rendezvous_port)
echo "rendezvous: ${MASTER_ADDR:-127.0.0.1}:$PORT ($NNODES node(s) x $NPROC processes)" >&2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CMD=("$PY" -m torch.distributed.run
  --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="${NODE_RANK:-0}"
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$PORT"
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}"
  -m nemo_upcycle.train "$@")
if [ -n "${DRY_RUN:-}" ]; then
  echo "would run: ${CMD[*]}"
  exit 0
fi
exec "${CMD[@]}"
