"""Stop cleanly before a time limit or on preemption: finish the step, save, exit 75.

Slurm warns a job before its time limit with the signal ``#SBATCH --signal=USR1@<s>`` names
(sent to every task of the step), and preemption or ``scancel`` sends SIGTERM (then SIGKILL
after the cluster's grace time). On either signal :class:`PreemptionStop` lets every rank
finish the step it is in, writes one normal NeMo checkpoint (``<name>-last`` in the job's
checkpoint folder, the one a relaunch resumes from), and the job exits with status
:data:`EXIT_CODE`, which ``scripts/slurm/upcycle.sbatch`` answers with ``scontrol requeue``.

Why not what the libraries offer: Lightning's SIGTERM handling ends the run at the step's
end without a checkpoint, and its SLURM auto-requeue saves from inside the USR1 handler, i.e.
mid-step and mid-collective on a megatron model, into a file AutoResume never reads. NeMo's
``PreemptionCallback`` listens to one signal, on rank 0 only (a signal that reaches rank 5
first is ignored), broadcasts a CUDA tensor and exits with status 0, which a script cannot
tell from a finished run.

The signal handler only takes note: the trainer may be inside a collective or a save when it
arrives. After each step every rank all-reduces what it has seen (two integers), so all ranks
stop after the same step even when the signal reached only some of them, or reached them
during different steps.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". Distinct from
# a user error (2) and a guard's stop (3); a relaunch of the same command resumes.
EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class TrainingPreempted(RuntimeError):
    """Training stopped on a signal after a complete checkpoint was written (or none could be)."""

    def __init__(self, message: str, saved: bool):
        super().__init__(message)
        self.saved = saved


class PreemptionStop(pl.Callback):
    """Runs after the metrics and guard callbacks (it is listed after them), so the step it stops
    after is in ``metrics.jsonl`` and a tripped guard wins over a save."""

    def __init__(self):
        self._seen = {sig: False for sig in STOP_SIGNALS}

    # -- signals ---------------------------------------------------------------------------
    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self._seen[signal.Signals(signum)] = True

    def setup(self, trainer, pl_module, stage):
        # From here on a signal is noted, also while the model is upcycled or loaded; Lightning
        # records these handlers as the ones to restore when the trainer tears down.
        self.install()
        hold_stop_signals_while_saving(trainer.strategy)

    def on_train_start(self, trainer, pl_module):
        # Lightning replaced the SIGTERM handler meanwhile with its own, which would end the run
        # at the step's end with nothing saved.
        self.install()

    # -- the stop --------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        received = self._received_on_any_rank()
        step = trainer.global_step
        if not received or 0 < trainer.max_steps <= step:  # the last step: the normal end saves it
            return
        names = " and ".join(received)
        log.info("%s received: stopping after step %d", names, step)
        saved = _save_checkpoint(trainer)
        if dist.is_initialized():
            dist.barrier()  # rank 0 removes the save's -unfinished marker last: nobody leaves before it
        if saved:
            raise TrainingPreempted(
                f"training stopped after step {step}: {names} received (Slurm's time-limit warning, "
                f"preemption or scancel); checkpoint {saved} is complete. Relaunching the same command "
                "resumes from it (scripts/slurm/upcycle.sbatch requeues itself).", saved=True)
        raise TrainingPreempted(
            f"training stopped after step {step}: {names} received; nothing was saved because "
            "trainer.checkpoint_every_n_steps=0, so a relaunch starts over.", saved=False)

    def _received_on_any_rank(self) -> list[str]:
        from nemo_upcycle.platform.device import collective_device

        seen = torch.tensor([int(self._seen[sig]) for sig in STOP_SIGNALS], dtype=torch.int32,
                            device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        return [sig.name for sig, flag in zip(STOP_SIGNALS, seen.tolist()) if flag]


@contextlib.contextmanager
def stop_signals_held():
    """Block the stop signals in this thread for the duration (they stay pending, or another
    thread takes them: either way the handler notes them, none is lost).

    Slurm signals every process of the step, and torchrun every process of a worker's group,
    not just the training processes. A checkpoint save starts helper processes: megatron's
    writer processes and its results-queue manager (spawned at the first save, alive from then
    on), on GPU the asynchronous save's worker. Created while the signals are blocked, they
    inherit the blocked mask (through fork and exec) and are not killed by the signal, which
    would otherwise break this save or the next one (a BrokenPipeError in the writer).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def hold_stop_signals_while_saving(strategy) -> None:
    """Every checkpoint save (periodic, final, ours) runs under :func:`stop_signals_held`."""
    from multiprocessing import resource_tracker

    save = strategy.save_checkpoint
    if getattr(save, "holds_stop_signals", False):
        return
    # multiprocessing starts its resource tracker at the first spawn and unblocks SIGTERM in
    # the spawning thread as it does (resource_tracker.ensure_running), so the manager spawned
    # next would die of SIGTERM after all. Started now, the saves find it running.
    with stop_signals_held():
        resource_tracker.ensure_running()

    def save_checkpoint(*args, **kwargs):
        with stop_signals_held():
            return save(*args, **kwargs)

    save_checkpoint.holds_stop_signals = True
    strategy.save_checkpoint = save_checkpoint


def _save_checkpoint(trainer) -> Optional[str]:
    """Write ``<name>-last`` for this step through NeMo's ModelCheckpoint (as NeMo's own
    PreemptionCallback does), waiting for an asynchronous save to finish; its path, or None
    when the job saves no checkpoints."""
    from nemo.utils.callbacks.dist_ckpt_io import AsyncFinalizableCheckpointIO

    checkpoint = trainer.checkpoint_callback
    if checkpoint is None:
        return None
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
    if isinstance(trainer.strategy.checkpoint_io, AsyncFinalizableCheckpointIO):
        trainer.strategy.checkpoint_io.maybe_finalize_save_checkpoint(blocking=True)
    return str(checkpoint.last_model_path).removesuffix(".ckpt")

