#!/usr/bin/env bash
# The GPU run, prepared to fit one lease of the lent machine: one H100/H200, Python 3.12 with
# torch 2.11 (CUDA 13), transformers 5.x and lightning preinstalled, no internet, at most
# 64 MiB carried with the working tree, about 15 minutes of device time including the start.
#
#   bash benchmarks/gpu/fetch_wheels.sh     # here, once: the wheels the image lacks (~48 MB)
#   bash benchmarks/gpu/prove_wheels.sh     # here: they import beside the image's packages
#   # the device tool, one call, carry=["benchmarks/gpu/wheels"], timeout_s=560:
#   bash benchmarks/gpu/run.sh              # there: writes $OUT/device_run.json and device_run.log
#   DRY_RUN=1 bash benchmarks/gpu/run.sh    # any CPU machine: the same steps on tiny sizes
#
# It installs the carried wheels with `pip install --no-index --no-deps --target` (PYTHONPATH
# puts them before the image's packages: transformers 4.57.6 and lightning 2.4.0, the versions
# the project is tested with, win over the image's), then runs benchmarks/gpu/device_run.py:
# (a) verify of a bf16 HF Llama, (b) train 3 steps + a resumed relaunch to 6, export_hf,
# transformers vs megatron-core on the trained checkpoint, (c) dense vs E8T2 throughput and
# MFU at a 1B shape, sequence 2048, bf16. Transformer Engine cannot be installed within a
# lease (transformer-engine-torch ships only as source to compile), so megatron-core's local
# layer spec runs, and the output says so.
#
# Time: the device tool's call is killed at its timeout_s (560 s), so the run has one deadline,
# DEVICE_RUN_BUDGET_S seconds (default 470 on the GPU, 780 in a dry run) counted from this
# script's start (DEVICE_RUN_STARTED, set here): each step gets min(its own limit, the time
# left), a step with too little left is recorded as skipped, and $OUT/device_run.json is
# rewritten after every step. Each step's output streams to $OUT/<step>.log as it runs.
#
# Environment: OUT (default benchmarks/results/gpu; the device tool sets it), PYTHON
# (python3 there, the project's .venv in a dry run), WHEELS (benchmarks/gpu/wheels),
# SITE (/tmp/gpu-site), WORK (scratch; default a temporary folder), DEVICE_RUN_BUDGET_S.
set -euo pipefail
export DEVICE_RUN_STARTED=${DEVICE_RUN_STARTED:-$(date +%s)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
DRY_RUN=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
WHEELS=${WHEELS:-$REPO/benchmarks/gpu/wheels}
SITE=${SITE:-/tmp/gpu-site}
install=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")

if [ "$DRY_RUN" = 1 ]; then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  OUT=${OUT:-$(mktemp -d -t gpu-dry-XXXX)}
  mkdir -p "$OUT"
  echo "(dry run) on the GPU machine this runs, offline:"
  echo "  python3 ${install[*]} $WHEELS/*.whl"
  echo "  export PYTHONPATH=$SITE:$REPO"
  echo "(dry run) with these wheels, fetched here by: $(PRINT_ONLY=1 bash benchmarks/gpu/fetch_wheels.sh | head -1)"
  # Wheels carried by prove_wheels.sh's environment are already on PYTHONPATH; none is installed here.
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  ARGS=(--dry-run)
else
  PY=${PYTHON:-python3}
  OUT=${OUT:-$REPO/benchmarks/results/gpu}
  mkdir -p "$OUT"
  # A setup failure still leaves $OUT/device_run.json (and setup.log) saying why.
  setup_failed() {
    echo "$1" | tee -a "$OUT/setup.log"
    printf '{"benchmark": "gpu device run", "setup_error": "%s", "steps": {}, "failed_steps": ["setup"]}\n' \
      "$(printf '%s' "$1" | tr -d '"\\')" > "$OUT/device_run.json"
    exit 2
  }
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || setup_failed "needs the lent image's Python 3.12 (PYTHON=$PY)"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 \
    || setup_failed "no wheels in $WHEELS: run benchmarks/gpu/fetch_wheels.sh here and carry that folder"
  "$PY" "${install[@]}" "$WHEELS"/*.whl 2>&1 | tee "$OUT/setup.log" \
    || setup_failed "pip install of the carried wheels failed (setup.log)"
  export PYTHONPATH="$SITE:$REPO"
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no GPU visible"' 2>&1 | tee -a "$OUT/setup.log" \
    || setup_failed "torch sees no GPU (setup.log)"
  # megatron-core 0.15.3 compiles a small CUDA allocator extension (nvcc) the first time it is
  # imported (inference/unified_memory.py; cached in ~/.cache/torch_extensions): for the
  # H100/H200's architecture only.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  ARGS=()
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
[ -n "${WORK:-}" ] && ARGS+=(--work "$WORK")
set +e
"$PY" benchmarks/gpu/device_run.py --out "$OUT" "${ARGS[@]}" 2>&1 | tee "$OUT/device_run.log"
status=${PIPESTATUS[0]}
echo "results in $OUT (device_run.json, device_run.log, one <step>.log per step); exit $status"
exit "$status"
