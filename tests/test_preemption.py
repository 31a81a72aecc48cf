"""Slurm's time-limit warning and preemption on a real training job (2 gloo ranks).

Slurm signals the tasks of a step themselves (``#SBATCH --signal=USR1@<s>`` before the time
limit, SIGTERM on preemption, ``scancel`` or at the limit), so the test signals each worker
and every process it started (the checkpoint writer's helpers too), one rank first: every rank must finish the step, one checkpoint is written, the
job exits with status 75 and the same command resumes from that checkpoint.
"""
import math
import signal

import pytest

from nemo_upcycle.training.preemption import EXIT_CODE
from tests.workers.training_checks import (
    logged_step, read_metrics, run_and_signal_workers, run_training, saving, tiny_training_overrides,
)

pytestmark = pytest.mark.multirank

EP2_8_STEPS = ["parallel.ep=2", "trainer.max_steps=8", "trainer.distributed_optimizer=true"]


def test_signal_on_one_rank_stops_every_rank_with_one_checkpoint_and_relaunch_resumes(tiny_smollm_vocab, cache_dir,
                                                                                    tmp_path):
    """SIGUSR1 reaches rank 1 alone after step 5 is logged (rank 0 never sees it); while the
    checkpoint is written SIGTERM reaches both ranks (the time limit arriving mid-save) and
    must not cut the save short."""
    log_dir = tmp_path / "run"
    overrides = tiny_training_overrides(tiny_smollm_vocab, cache_dir, log_dir, *EP2_8_STEPS)
    result, seconds = run_and_signal_workers(2, overrides, log_dir, [
        (logged_step(log_dir, 5), [1], signal.SIGUSR1),
        (saving(log_dir), [0, 1], signal.SIGTERM),
    ])
    out = result.stdout
    assert result.returncode != 0 and out.count(f"exitcode  : {EXIT_CODE}") == 2, out[-4000:]
    assert seconds < 60, f"the job took {seconds:.0f}s to stop after the signal"
    steps = [r["step"] for r in read_metrics(log_dir)]
    stopped = steps[-1]
    # Every rank stops after the first step end at which one of them had noted the signal:
    # step 5 when rank 1 gets it before joining step 5's agreement, else 6 (7 on a machine so
    # loaded that the signal lands while rank 1 already waits in step 6's agreement).
    assert stopped in (5, 6, 7) and steps == list(range(1, stopped + 1)), steps
    assert f"training stopped after step {stopped}: SIGUSR1 received" in out, out[-4000:]
    assert out.count("training stopped after step") == 1, "rank 0 reports the stop, once"

    ckpts = log_dir / "upcycle" / "checkpoints"
    # NeMo's global_step in the names counts from 0; the step-4 checkpoint gave way to this one.
    (saved,) = ckpts.iterdir()
    assert saved.name.endswith("-last") and f"-step={stopped - 1}-consumed_samples={4 * stopped}." in saved.name, saved
    assert f"checkpoint {saved} is complete" in out

    out = run_training(2, overrides)
    assert out.returncode == 0, out.stdout[-4000:]
    assert f"resuming from {saved}" in out.stdout and "upcycled online" not in out.stdout, out.stdout[-4000:]
    records = {r["step"]: r for r in read_metrics(log_dir)}
    assert sorted(records) == list(range(1, 9)) and len(read_metrics(log_dir)) == 8, "each step trained once"
    # The resumed steps follow the schedule where it stopped (the scheduler's state came back
    # with the weights): the maths of the configured cosine, trainer.lr 1e-3 -> trainer.min_lr
    # 1e-4 over the 7 steps after 1 warmup step. (No uninterrupted run to compare the losses
    # with: that would be a launch of its own; test_training's bit-exact resume covers it.)
    for step in range(stopped + 1, 9):
        cosine = 1e-4 + (1e-3 - 1e-4) / 2 * (1 + math.cos(math.pi * (step - 2) / 7))
        assert records[step]["lr"] == pytest.approx(cosine, rel=1e-6), (step, records[step]["lr"], cosine)
        assert math.isfinite(records[step]["loss"]), records[step]
