#!/usr/bin/env bash
# The whole test suite, including the slow end-to-end checks on the full SmolLM2-135M
# (marked `slow`; deselect them with `bash scripts/run_tests.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Let the first process cache the bytecode of this package and the tests (the installed
# packages were compiled by setup_env.sh); with it set, each of the suite's hundreds of
# processes would compile them again.
unset PYTHONDONTWRITEBYTECODE
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
# An empty cache on every run, as on a machine that never ran the project: the first-run
# import of the embedded model and the data's tokenization run in every CI run (the first
# test to need the cache runs the README's main command to fill it: tests/conftest.py).
NEMO_UPCYCLE_CACHE=$(mktemp -d -t nemo-upcycle-cache.XXXXXX)
export NEMO_UPCYCLE_CACHE
trap 'rm -rf "$NEMO_UPCYCLE_CACHE"' EXIT
# Two pytest-xdist workers, each taking whole files (their module fixtures are built once): half
# of a serial run's time was one busy core (single-process tests, imports, file writes), which
# the other worker now fills. The costly session fixtures are shared (tests/conftest.py).
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@" tests
