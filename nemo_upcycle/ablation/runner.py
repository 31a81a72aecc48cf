"""Run each grid point as its own training job, evaluate it, keep what finished.

Every run is ``torchrun -m nemo_upcycle.train`` in fresh processes (the same command a user
would type, so nothing leaks between runs) with ``eval.after_training=true``: the job
trains, then scores MMLU and perplexity on the model still in memory. A run is finished
when its ``result.json`` exists and was made with the same overrides; a relaunch of the
grid skips those and redoes (or, if the run saved checkpoints, resumes) the others.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from nemo_upcycle.ablation.grid import GridRun
from nemo_upcycle.platform.launcher_env import standalone_env
from nemo_upcycle.util.atomic import write_json_atomic
from nemo_upcycle.util.ports import free_port

RESULT_FILE = "result.json"
# Steps whose time includes one-off work (graph warm-up, first allocations) are left out of
# the throughput figure.
WARMUP_STEPS = 2


@dataclass
class RunOutcome:
    run: GridRun
    result: Optional[dict]  # None when the run failed
    reused: bool = False
    error: str = ""


def run_overrides(run: GridRun, common: Sequence[str], run_dir: Path) -> list[str]:
    """Everything the training job of ``run`` is launched with; also the run's fingerprint."""
    return [*common, *run.overrides, f"log_dir={run_dir}", "eval.after_training=true"]


def finished_result(run_dir: Path, overrides: list[str]) -> Optional[dict]:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("overrides") == overrides else None


def prepare_run_dir(run_dir: Path) -> None:
    """A run that saved checkpoints resumes from them; any other leftover starts afresh."""
    checkpoints = run_dir / "upcycle" / "checkpoints"
    if run_dir.exists() and not (checkpoints.is_dir() and any(checkpoints.glob("*-last"))):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def launch(overrides: list[str], nproc: int, log_path: Path, max_steps: int, timeout_s: float,
           metrics_path: Path, description: str) -> int:
    """torchrun the training job, its output to ``log_path``, a progress bar from its metrics."""
    from nemo_upcycle.util.progress import progress_bar

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--max_restarts=0", "-m", "nemo_upcycle.train", *overrides]
    # Each run is a job of its own, also when the grid itself runs inside an sbatch or torchrun job.
    env = standalone_env(PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"),
                         OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Own session: on a timeout the whole job (torchrun and its ranks) is killed at once.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        with progress_bar(total=max_steps, desc=description, unit="step", leave=True, mininterval=5.0) as bar:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    with open(log_path, "a") as log:
                        log.write(f"\nkilled by the ablation runner after {timeout_s:.0f}s (ablate.run_timeout_s)\n")
                    return -signal.SIGKILL
                step = max((r["step"] for r in read_jsonl(metrics_path)), default=0)
                if step > bar.n:
                    bar.update(min(step, max_steps) - bar.n)
                time.sleep(2.0)
    finally:
        # A timeout, Ctrl-C or SIGTERM of the runner must not leave the job's ranks running.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records


def summarize(run: GridRun, run_dir: Path, overrides: list[str], seconds: float) -> dict:
    """What the report needs from one finished run: its metrics and its evaluation."""
    by_step = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}  # a resumed run logs some steps twice
    steps = [by_step[s] for s in sorted(by_step)]
    losses = [r["loss"] for r in steps if "loss" in r]
    timed = [r["tokens_per_s"] for r in steps[WARMUP_STEPS:]] or [r["tokens_per_s"] for r in steps]
    summary = json.loads((run_dir / "eval" / "results.json").read_text())["summary"]
    # The first MMLU task the grid's eval.tasks names (checked: ablation/checks.py).
    mmlu = next(k for k in summary if k.startswith("mmlu") and k.endswith("_acc"))
    tail = max(1, min(5, len(losses)))

    def mean_of(key: str) -> Optional[float]:
        values = [r[key] for r in steps if key in r]
        return sum(values) / len(values) if values else None

    return {
        "name": run.name,
        "label": run.label,
        "router": run.router,
        "capacity_factor": run.capacity_factor,
        "moe": run.moe,
        "steps": len(steps),
        "final_loss": sum(losses[-tail:]) / tail,
        "losses": losses,
        "ppl": summary["ppl"],
        "mmlu_acc": summary[mmlu],
        "mmlu_n": summary["n"],
        "tokens_per_s": sorted(timed)[len(timed) // 2],  # median: robust to a noisy shared machine
        "dropped_fraction": mean_of("dropped_fraction"),
        "max_load_ratio": mean_of("max_load_ratio"),
        "router_entropy": mean_of("router_entropy"),
        "wall_s": seconds,
        "overrides": overrides,
    }


def run_grid(runs: list[GridRun], common: Sequence[str], ablate: Any, max_steps_of: dict[str, int]) -> list[RunOutcome]:
    out_dir = Path(ablate.out_dir)
    outcomes = []
    for index, run in enumerate(runs, 1):
        run_dir = out_dir / run.name
        overrides = run_overrides(run, common, run_dir)
        done = finished_result(run_dir, overrides)
        tag = f"[{index}/{len(runs)}] {run.name}"
        if done is not None:
            print(f"{tag}: finished earlier, reusing {run_dir / RESULT_FILE}", flush=True)
            outcomes.append(RunOutcome(run, done, reused=True))
            continue
        prepare_run_dir(run_dir)
        started = time.monotonic()
        rc = launch(overrides, ablate.nproc, run_dir / "train.log", max_steps_of[run.name],
                    ablate.run_timeout_s, run_dir / "metrics.jsonl", tag)
        seconds = time.monotonic() - started
        if rc != 0 or not (run_dir / "eval" / "results.json").is_file():
            tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
            print(f"{tag}: FAILED (exit {rc}) after {seconds:.0f}s; log: {run_dir / 'train.log'}\n{tail}", flush=True)
            outcomes.append(RunOutcome(run, None, error=f"exit {rc}, see {run_dir / 'train.log'}"))
            continue
        result = summarize(run, run_dir, overrides, seconds)
        write_json_atomic(run_dir / RESULT_FILE, result)
        print(f"{tag}: done in {seconds:.0f}s: final loss {result['final_loss']:.4f}, ppl {result['ppl']:.3f}, "
              f"MMLU {100 * result['mmlu_acc']:.1f}% of {result['mmlu_n']}", flush=True)
        outcomes.append(RunOutcome(run, result))
    return outcomes
