"""The project's Slurm template under a real Slurm: ``sbatch scripts/slurm/upcycle.sbatch``.

A local cluster (slurmctld + two slurmd "nodes" n1, n2 on this host, tests.support.
local_slurm) runs the template exactly as a user submits it, with the CPU-node overrides its
header documents. Two jobs of one rank per node are submitted at once with different
log_dirs: each must train its own run on both nodes (world size 2, ranks on n1 and n2) at its
own rendezvous port. Then the same sbatch line is submitted again and must resume from the
checkpoint instead of upcycling.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from nemo_upcycle.platform.launcher_env import slurm_job_port, standalone_env
from tests.support.local_slurm import SlurmUnavailable, local_slurm
from tests.conftest import REPO
from tests.workers.training_checks import losses_by_step

pytestmark = pytest.mark.multirank

TEMPLATE = "scripts/slurm/upcycle.sbatch"
STEPS = 2  # one checkpoint, after the last step: what the relaunch resumes from
JOB_TIMEOUT_S = 420
# The template's own inputs: a value left over from the caller's shell would pick another Python or checkout.
# (The launcher variables of an enclosing job, CI under torchrun or Slurm, go by standalone_env.)
TEMPLATE_INPUTS = ("PYTHON", "NEMO_UPCYCLE_DIR")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        with local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except SlurmUnavailable as err:
        pytest.skip(f"Slurm cannot be installed here: {err}")


def _sbatch_args(tiny_smollm_vocab, cache_dir, out_dir: Path, log_dir: Path) -> list[str]:
    """The template's CPU-node line (its header comment), one rank on each of two nodes."""
    path, tokenizer = tiny_smollm_vocab
    return [
        "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe",
        "--time=00:15:00", f"--output={out_dir}/%x-%j.out", TEMPLATE,
        "model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}",
        f"model.tokenizer={tokenizer}", f"cache_dir={cache_dir}", f"log_dir={log_dir}",
        "trainer.seq_length=64", "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
        "trainer.lr=1e-3", "trainer.min_lr=1e-4", "trainer.warmup_steps=1", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=1",
        f"trainer.checkpoint_every_n_steps={STEPS}",
    ]


def _job_env() -> dict:
    env = {k: v for k, v in standalone_env().items() if k not in TEMPLATE_INPUTS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _submit_and_wait(slurm, lines: list[list[str]]) -> list[tuple[str, dict, str]]:
    """Submit every line from the checkout's root (SLURM_SUBMIT_DIR: the template takes its
    .venv from there) at once; wait for all; return (job id, final record, output) of each."""
    ids = [slurm.sbatch(args, cwd=REPO, env=_job_env()) for args in lines]
    records = slurm.wait(ids, JOB_TIMEOUT_S)
    for job_id, record in records.items():
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (
            f"job {job_id} ended {record['JobState']} (exit {record['ExitCode']})\n"
            f"{slurm.outputs({job_id: record}, lines=80)}\n{slurm.logs()}")
    return [(j, records[j], Path(records[j]["StdOut"]).read_text(errors="replace")) for j in ids]


@pytest.fixture(scope="module")
def concurrent_jobs(slurm, tiny_smollm_vocab, cache_dir, tmp_path_factory):
    """Two jobs submitted at once on the same two nodes, each with its own log_dir."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    log_dirs = [root / "run_a", root / "run_b"]
    lines = [_sbatch_args(tiny_smollm_vocab, cache_dir, root, d) for d in log_dirs]
    started = time.monotonic()
    jobs = _submit_and_wait(slurm, lines)
    print(f"two concurrent 2-node jobs: {time.monotonic() - started:.0f}s")
    return [dict(id=j, record=r, out=out, log_dir=d, line=line)
            for (j, r, out), d, line in zip(jobs, log_dirs, lines)]


def _rendezvous_port(out: str) -> int:
    (port,) = re.findall(r"^rendezvous: n1:(\d+)$", out, flags=re.M)
    return int(port)


def test_two_node_job_trains_one_rank_on_each_node(slurm, concurrent_jobs):
    """The template under sbatch: srun starts rank 0 on n1 and rank 1 on n2, with the
    checkout's .venv python, and they train together as one world of 2."""
    job = concurrent_jobs[0]
    record, out, log_dir = job["record"], job["out"], job["log_dir"]
    assert record["NodeList"] == "n[1-2]" and record["NumNodes"] == "2", record
    assert f"python: {REPO}/.venv/bin/python" in out, out[-3000:]
    assert out.count("upcycled online from") == 1 and "training finished: " in out, out[-3000:]
    assert sorted(losses_by_step(log_dir)) == list(range(1, STEPS + 1))
    for rank in (0, 1):
        text = (log_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"MEMBER: {rank + 1}/2" in text, text[-3000:]
    # Each node's slurmd launched the job's step: one task on each "node".
    for node in ("n1", "n2"):
        log = (slurm.root / "log" / f"slurmd-{node}.log").read_text()
        assert f"launch task StepId={job['id']}.0 " in log, log[-3000:]


def test_concurrent_jobs_on_the_same_nodes_do_not_interfere(concurrent_jobs):
    """Both ran at the same time on n1 and n2, each at the port derived from its job id, and
    each trained its own run: a shared rendezvous would have made one world of 4 (or hung)."""
    a, b = concurrent_jobs
    starts = [time.strptime(j["record"]["StartTime"], "%Y-%m-%dT%H:%M:%S") for j in (a, b)]
    ends = [time.strptime(j["record"]["EndTime"], "%Y-%m-%dT%H:%M:%S") for j in (a, b)]
    assert max(starts) < min(ends), ("the jobs did not overlap", starts, ends)
    ports = [_rendezvous_port(j["out"]) for j in (a, b)]
    assert ports == [slurm_job_port(a["id"]), slurm_job_port(b["id"])] and ports[0] != ports[1], ports
    for job in (a, b):
        assert sorted(losses_by_step(job["log_dir"])) == list(range(1, STEPS + 1)), job["log_dir"]
        assert job["out"].count("upcycled online from") == 1, job["out"][-3000:]
        assert "MEMBER: 2/2" in (job["log_dir"] / "logs" / "rank1.log").read_text()


def test_relaunch_of_the_same_line_resumes_without_upcycling(slurm, concurrent_jobs):
    """The user's recovery: submit the same line again. The job finds the checkpoint in its
    log_dir and resumes from it (here: already at max_steps, so it trains nothing more)."""
    job = concurrent_jobs[0]
    checkpoints = job["log_dir"] / "upcycle" / "checkpoints"
    (last,) = checkpoints.glob("*-last")
    before = losses_by_step(job["log_dir"])
    ((_, _, out),) = _submit_and_wait(slurm, [job["line"]])
    assert f"resuming from {last}" in out and "upcycled online" not in out, out[-3000:]
    assert f"training finished: {STEPS} steps (resumed from {last})" in out, out[-3000:]
    assert losses_by_step(job["log_dir"]) == before and list(checkpoints.glob("*-last")) == [last]
