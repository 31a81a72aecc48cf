"""The version guard of nemo_upcycle/compat/: each patch of another package's internals runs only
on the version it was written for; any other is one clear user error (exit status 2) before
anything is patched."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nemo_upcycle.compat import versions
from nemo_upcycle.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("patch", sorted(versions.PATCHES))
def test_the_installed_versions_are_the_ones_written_for(patch):
    versions.require(patch)  # the test environment is constraints.txt's


@pytest.mark.parametrize("found, written_for, ok", [
    ("0.15.3", "0.15.3", True), ("0.15.2", "0.15.3", False), ("0.15.3rc1", "0.15.3", False),
    (None, "0.15.3", False), ("2.7.3", "2.7.*", True), ("2.7.0rc1", "2.7.*", True),
    ("0.15.0+nv25.10", "0.15.*", True), ("2.8.0", "2.7.*", False), ("2.70.0", "2.7.*", False),
])
def test_exact_versions_and_release_lines(found, written_for, ok):
    assert versions.matches(found, written_for) is ok


def test_another_version_names_package_found_written_for_and_fix(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda dist: {"megatron-core": "0.16.0"}.get(dist, "2.7.3"))
    with pytest.raises(versions.VersionMismatch) as err:
        versions.require("nemo_cpu")
    message = str(err.value)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    for part in ("megatron-core 0.16.0 is installed", "nemo_upcycle/compat/nemo_cpu.py", "written for megatron-core 0.15.3",
                 "constraints.txt", "'megatron-core==0.15.3'"):
        assert part in message, message
    assert "nemo-toolkit" not in message  # the matching one is not named


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU patches apply only without a GPU")
def test_the_cpu_patch_refuses_before_patching_and_the_command_exits_2():
    """In a fresh process (the patches are process-wide): a mismatching megatron-core leaves torch
    unpatched, and the commands' error handling turns the refusal into one line and exit status 2."""
    code = (
        "import torch\n"
        "from nemo_upcycle.compat import versions\n"
        "versions.installed_version = lambda dist: '0.16.0'\n"
        "from nemo_upcycle.compat.cpu import enable_cpu_support\n"
        "original = torch.cuda.synchronize\n"
        "try:\n"
        "    enable_cpu_support()\n"
        "except versions.VersionMismatch:\n"
        "    assert torch.cuda.synchronize is original\n"
        "    print('refused before patching')\n"
        "from nemo_upcycle.cli.common import user_errors\n"
        "with user_errors():\n"
        "    enable_cpu_support()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "refused before patching" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: megatron-core 0.16.0 is installed, but megatron-core on a CPU-only torch" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
