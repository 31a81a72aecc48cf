"""Helpers for the end-to-end training tests: launch the real job, read what it wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.multirank import free_port

REPO = Path(__file__).resolve().parents[2]


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--max_restarts=0", "-m", "nemo_upcycle.train", *overrides]


def run_training(nproc: int, overrides: list[str], timeout_s: float = 420,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.Popen(train_command(nproc, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"training did not finish within {timeout_s}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# The README's main command (scripts/demo.sh's training step), cut to 2 steps of 2 x 64
# tokens without a checkpoint or validation: what the first run on a new machine goes through
# (the embedded import and the data's tokenization on rank 0, upcycling, NeMo's training).
README_MAIN_COMMAND = ["model=smollm2_135m", "moe=e8t2", "router=topk_softmax", "parallel=ep2", "trainer=demo"]
FEW_TINY_STEPS = ["trainer.max_steps=2", "trainer.seq_length=64", "trainer.checkpoint_every_n_steps=0",
                  "trainer.limit_val_batches=0", "trainer.val_check_interval=1000"]


def run_readme_main_command(cache: Path, log_dir: Path, timeout_s: float = 900) -> dict:
    """The README's main command under torchrun on 2 ranks with ``cache`` as the user's cache
    (NEMO_UPCYCLE_CACHE); its output, exit status and wall time."""
    started = time.monotonic()
    result = run_training(2, [*README_MAIN_COMMAND, f"log_dir={log_dir}", *FEW_TINY_STEPS], timeout_s,
                          env={"NEMO_UPCYCLE_CACHE": str(cache)})
    return {"returncode": result.returncode, "output": result.stdout, "seconds": time.monotonic() - started}


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


def _start_logging_to_file(nproc: int, overrides: list[str], log_dir: Path,
                           tag: str) -> tuple[subprocess.Popen, Path]:
    """Start the job in its own session, its output in ``<log_dir>-<tag>.log`` (not a pipe:
    helper processes of a killed worker can outlive it and would hold a pipe open)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = log_dir.with_name(f"{log_dir.name}-{tag}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(nproc, overrides), stdout=out, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO, env=env, start_new_session=True)
    return proc, log


def _kill_a_rank_when(nproc: int, overrides: list[str], log_dir: Path, ready, what: str, timeout_s: float,
                      poll_s: float = 0.2) -> tuple[subprocess.CompletedProcess, float]:
    """Output goes to a file, not a pipe: helper processes of the killed worker (the
    checkpoint writer's multiprocessing manager) can outlive it and would hold a pipe open.
    """
    proc, log = _start_logging_to_file(nproc, overrides, log_dir, "killed")
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


def run_keeping_a_checkpoint(nproc: int, overrides: list[str], log_dir: Path, after_step: int, into: Path,
                             timeout_s: float = 420) -> subprocess.CompletedProcess:
    """Run the job to its end, and keep the checkpoint saved after ``after_step`` in
    ``into``'s checkpoint folder (as a relaunch there would find it), although the job later
    replaces it with its last one: one launch is then both the uninterrupted reference and the
    checkpoint to resume from. The files are hard-linked the moment NeMo has finished writing
    them (its ``-unfinished`` marker gone), which takes milliseconds and survives the job
    deleting the folder afterwards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ckpt_dir = log_dir / "upcycle" / "checkpoints"
    name = f"-step={after_step - 1}-"  # NeMo's global_step counts from 0
    log = log_dir.with_name(log_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    kept = None
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(nproc, overrides), stdout=out, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kept is None:
                kept = _link_when_complete(ckpt_dir, name, into / "upcycle" / "checkpoints")
            time.sleep(0.02)
        if proc.poll() is None:
            raise AssertionError(f"training did not finish within {timeout_s}s:\n{log.read_text()[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert kept is not None or proc.returncode != 0, f"no complete checkpoint{name}* was seen in {ckpt_dir}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def _link_when_complete(ckpt_dir: Path, name: str, into: Path):
    """Hard-link the complete checkpoint whose name holds ``name`` into ``into``; None if none yet."""
    import shutil

    if not ckpt_dir.is_dir():
        return None
    for path in ckpt_dir.iterdir():
        if name in path.name and path.is_dir() and not (ckpt_dir / (path.name + "-unfinished")).exists():
            into.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copytree(path, into / path.name, copy_function=os.link))
    return None


def read_metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses_by_step(log_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(log_dir) if "loss" in r}


def run_and_signal_workers(nproc: int, overrides: list[str], log_dir: Path, signals: list,
                           timeout_s: float = 420) -> tuple[subprocess.CompletedProcess, float]:
    """Start the job and deliver signals to its workers the way Slurm delivers them to the
    tasks of a step: to each training process and every process it started, one rank at a
    time, not through the launcher. ``signals``: ``(ready, ranks, signal)`` in order, each sent to those global
    ranks once ``ready()`` holds. Returns the result and the seconds from the first signal to
    the job's exit. Output goes to a file, as in :func:`_kill_a_rank_when`."""
    proc, log = _start_logging_to_file(nproc, overrides, log_dir, "signalled")
    deadline, first_signal, workers, next_lookup = time.monotonic() + timeout_s, None, {}, 0.0
    try:
        for ready, ranks, sig in signals:
            while len(workers) < nproc or not ready():  # the workers found first: the signal follows at once
                if proc.poll() is not None:
                    raise AssertionError(f"the job ended before it was due {sig.name}:\n{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"not due {sig.name} within {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
                if len(workers) < nproc and time.monotonic() > next_lookup:
                    workers, next_lookup = workers_by_rank(proc.pid), time.monotonic() + 0.5
                time.sleep(0.02)
            for rank in ranks:
                # Every process of that rank (torchrun starts each worker in its own process
                # group): Slurm signals all processes of a step, the save's helpers included.
                os.killpg(workers[rank], sig)
            first_signal = first_signal or time.monotonic()
        returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return subprocess.CompletedProcess(proc.args, returncode, log.read_text(), ""), time.monotonic() - first_signal
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers, if any
        except ProcessLookupError:
            pass


def workers_by_rank(launcher_pid: int) -> dict[int, int]:
    """torchrun's workers (its child processes), by the global rank in their environment."""
    pids = subprocess.run(["pgrep", "-P", str(launcher_pid), "-f", "nemo_upcycle.train"],
                          capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:  # gone meanwhile
            continue
        rank = next((int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = int(pid)
    return ranks


def logged_step(log_dir: Path, step: int):
    """A ``ready`` predicate: rank 0 has written ``step``'s line to metrics.jsonl."""
    return lambda: any(r["step"] >= step for r in read_metrics(log_dir))


def saving(log_dir: Path):
    """A ``ready`` predicate: NeMo is writing a checkpoint (its ``-unfinished`` marker exists)."""
    return lambda: any((log_dir / "upcycle" / "checkpoints").glob("*-unfinished"))


def training_overrides(cache_dir, log_dir, *more) -> list[str]:
    """The tiny jobs' training settings, on the Wikipedia sample: a few seconds a step;
    checkpoints after every 4th step."""
    return [
        f"cache_dir={cache_dir}", f"log_dir={log_dir}",
        "trainer.seq_length=64", "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
        "trainer.lr=1e-3", "trainer.min_lr=1e-4", "trainer.warmup_steps=1",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.checkpoint_every_n_steps=4",
        *more,
    ]


def tiny_training_overrides(tiny_smollm_vocab, cache_dir, log_dir, *more) -> list[str]:
    """The tiny Llama with SmolLM2's vocabulary and tokenizer, with :func:`training_overrides`."""
    path, tokenizer = tiny_smollm_vocab
    return ["model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}",
            f"model.tokenizer={tokenizer}", *training_overrides(cache_dir, log_dir, *more)]


class ReferenceRun:
    """One uninterrupted 8-step run at a layout, shared by the tests that need one: its
    losses (what a resumed run must reproduce), its own log_dir (the trained checkpoint after
    step 8, to export) and its checkpoint after step 4, kept aside while it trained on.

    It upcycles from its own copy of the dense checkpoint, deleted once it has trained: every
    test that resumes (naming the deleted folder, ``self.dense``), exports or evaluates it
    shows that a trained checkpoint stands alone."""

    def __init__(self, root: Path, tokenizer, layout: list[str]):
        """The run trained into ``root`` by :meth:`train`."""
        self.layout = [*layout, "trainer.max_steps=8"]
        self.log_dir, self._kept = root / "run", root / "kept"
        self.dense = (root / "dense", tokenizer)
        self.losses = losses_by_step(self.log_dir)
        (self.last,) = (self.log_dir / "upcycle" / "checkpoints").glob("*-last")

    @staticmethod
    def train(root: Path, tiny_smollm_vocab, cache_dir, layout: list[str]) -> None:
        import shutil

        dense, _ = tiny_smollm_vocab
        shutil.copytree(dense, root / "dense")
        overrides = tiny_training_overrides((root / "dense", tiny_smollm_vocab[1]), cache_dir, root / "run",
                                            *layout, "trainer.max_steps=8")
        result = run_keeping_a_checkpoint(2, overrides, root / "run", after_step=4, into=root / "kept")
        assert result.returncode == 0, result.stdout[-5000:]
        shutil.rmtree(root / "dense")

    def step4_log_dir(self, into: Path) -> Path:
        """A new log_dir holding the step-4 checkpoint alone (hard links: resuming there
        writes new checkpoints and never changes the files the other tests share)."""
        import shutil

        shutil.copytree(self._kept, into, copy_function=os.link)
        return into
