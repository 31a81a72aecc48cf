"""Helpers for the end-to-end training tests: launch the real job, read what it wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nemo_upcycle.testing.multirank import free_port

REPO = Path(__file__).resolve().parents[2]


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--max_restarts=0", "-m", "nemo_upcycle.train", *overrides]


def run_training(nproc: int, overrides: list[str], timeout_s: float = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(train_command(nproc, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"training did not finish within {timeout_s}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_and_kill_a_rank(nproc: int, overrides: list[str], metrics: Path, kill_after_step: int,
                        timeout_s: float = 420) -> tuple[subprocess.CompletedProcess, float]:
    """Start the job, SIGKILL one worker once ``kill_after_step`` is logged; return the
    result and how long torchrun took to exit after the kill."""
    def logged() -> bool:
        return metrics.is_file() and any(json.loads(l)["step"] >= kill_after_step
                                         for l in metrics.read_text().splitlines())

    return _kill_a_rank_when(nproc, overrides, metrics.parent, logged, f"step {kill_after_step}", timeout_s)


def run_and_kill_a_rank_during_save(nproc: int, overrides: list[str], log_dir: Path,
                                    timeout_s: float = 420) -> tuple[subprocess.CompletedProcess, float]:
    """Start the job, SIGKILL one worker while NeMo writes a checkpoint: NeMo places the
    ``<checkpoint>-unfinished`` marker before the first byte and removes it after the last
    (all ranks synchronised around both), so the marker's presence is the save in flight."""
    ckpt_dir = log_dir / "upcycle" / "checkpoints"
    return _kill_a_rank_when(nproc, overrides, log_dir, lambda: any(ckpt_dir.glob("*-unfinished")),
                             "a checkpoint save", timeout_s, poll_s=0.02)


def _kill_a_rank_when(nproc: int, overrides: list[str], log_dir: Path, ready, what: str, timeout_s: float,
                      poll_s: float = 0.2) -> tuple[subprocess.CompletedProcess, float]:
    """Output goes to a file, not a pipe: helper processes of the killed worker (the
    checkpoint writer's multiprocessing manager) can outlive it and would hold a pipe open.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = log_dir.with_name(log_dir.name + "-killed.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(nproc, overrides), stdout=out, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if ready():
                break
            if proc.poll() is not None:
                raise AssertionError(f"the job ended before {what}:\n{log.read_text()[-4000:]}")
            time.sleep(poll_s)
        else:
            raise AssertionError(f"no {what} within {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
        # torchrun's workers are the launcher's child processes.
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "nemo_upcycle.train"],
                                 capture_output=True, text=True).stdout.split()
        assert len(workers) == nproc, f"expected {nproc} workers, found {workers}"
        os.kill(int(workers[-1]), signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = proc.wait(timeout=180)
        return subprocess.CompletedProcess(proc.args, returncode, log.read_text(), ""), time.monotonic() - killed_at
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the failed job
        except ProcessLookupError:
            pass


def read_metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses_by_step(log_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(log_dir) if "loss" in r}
