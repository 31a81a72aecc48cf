"""The README's main command on a machine that never ran the project: an empty cache.

Under torchrun, rank 0 imports the embedded SmolLM2 in a subprocess (issue 26: that
subprocess inherited torchrun's TORCHELASTIC_USE_AGENT_STORE and waited forever) and
tokenizes the Wikipedia sample while rank 1 waits, then both upcycle and train. In CI the
session's cache starts empty (scripts/run_tests.sh), so the run that filled it is checked
here at no extra cost; with a warm cache the command runs again on an empty one of its own.
"""
import pytest

from tests.workers.training_checks import run_readme_main_command

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def test_readme_main_command_finishes_on_an_empty_cache(first_run, tmp_path):
    run = first_run or run_readme_main_command(tmp_path / "empty_cache", tmp_path / "run")
    out = run["output"]
    assert run["returncode"] == 0, out[-5000:]
    assert "importing the embedded smollm2_135m into" in out and "(first run only)" in out, out[-3000:]
    assert "data: " in out and " epochs" in out, out[-3000:]
    assert "training finished: 2 steps (first launch: upcycled)" in out, out[-3000:]
    print(f"README main command on an empty cache: {run['seconds']:.0f} s")
