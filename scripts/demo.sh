#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M -> E8T2 (top-k then softmax, dropless)
# on 2 CPU ranks with EP=2, a short training run on real Wikipedia text, then held-out
# perplexity before (dense) and after (the trained MoE). Extra arguments are Hydra overrides.
# Training prints its own progress lines once (rank 0); NeMo's, megatron's and Lightning's logs
# of each rank go to $LOG_DIR/logs/rank<k>.log (add verbose=true to see them on the console).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
PY=.venv/bin/python
LOG_DIR=${LOG_DIR:-runs/demo}
NPROC=${NPROC:-2}
COMMON=(model=smollm2_135m moe=e8t2 router=topk_softmax parallel=ep2 trainer=demo "log_dir=$LOG_DIR" "$@")

echo "== 1/3 upcycle online and train: torchrun --nproc_per_node=$NPROC -m nemo_upcycle.train ${COMMON[*]}"
$PY -m torch.distributed.run --nproc_per_node="$NPROC" -m nemo_upcycle.train "${COMMON[@]}"

LAST=$(ls -d "$LOG_DIR"/upcycle/checkpoints/*-last 2>/dev/null | sort | tail -n 1)
PPL=('eval.tasks=[heldout_news]')
echo "== 2/3 held-out perplexity of the dense SmolLM2 (before)"
$PY -m torch.distributed.run --nproc_per_node="$NPROC" -m nemo_upcycle.evaluate "${COMMON[@]}" moe=dense parallel.ep=1 \
  "${PPL[@]}" "log_dir=$LOG_DIR/eval_dense" | tee "$LOG_DIR/ppl_before.txt"
echo "== 3/3 held-out perplexity of the trained E8T2 MoE (after)"
$PY -m torch.distributed.run --nproc_per_node="$NPROC" -m nemo_upcycle.evaluate "${COMMON[@]}" \
  "eval.checkpoint='$LAST'" "${PPL[@]}" "log_dir=$LOG_DIR/eval_moe" | tee "$LOG_DIR/ppl_after.txt"

echo
echo "checkpoint:        $LAST"
echo "metrics:           $LOG_DIR/metrics.jsonl (TensorBoard: tensorboard --logdir $LOG_DIR/tensorboard)"
echo "expert load plot:  $(ls "$LOG_DIR"/expert_load_layer*.png)"
echo "training logs:     $LOG_DIR/logs/rank*.log (NeMo, megatron, Lightning; verbose=true prints them)"
$PY - "$LOG_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
log = Path(sys.argv[1])
losses = [r["loss"] for r in map(json.loads, (log / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
before = (log / "ppl_before.txt").read_text().strip().splitlines()[-1]
after = (log / "ppl_after.txt").read_text().strip().splitlines()[-1]
ppl = lambda line: float(line.split("ppl=")[1].split()[0])
print(f"training loss:     first 10 steps {sum(losses[:10]) / 10:.4f} -> last 10 steps {sum(losses[-10:]) / 10:.4f} ({len(losses)} steps)")
print(f"held-out ppl:      dense SmolLM2 {ppl(before):.3f} -> trained E8T2 {ppl(after):.3f}")
PYEOF
