"""Launch a Python function on N gloo ranks with torchrun, under a hard timeout.

If one rank raises, the others would wait in a collective forever; so every launch has a
wall-clock limit after which the whole process group is killed, torchrun tears the job
down as soon as one worker fails, and the error of every failed rank is reported.

The function is named as ``"package.module:function"`` and called on every rank with the
keyword arguments given (JSON-serialisable); each rank's return value comes back in a list
indexed by rank.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.platform.launcher_env import standalone_env
from nemo_upcycle.util.ports import free_port  # noqa: F401  (tests import it from here)

# The checkout: rank_entry and the targets (tests.workers.*, benchmarks.*) are imported from it.
REPO = Path(__file__).resolve().parents[2]


class MultiRankError(AssertionError):
    pass


def _rank_logs(log_dir: Path) -> str:
    parts = []
    for err in sorted(log_dir.rglob("stderr.log")):
        text = err.read_text(errors="replace").strip()
        if text:
            rank = err.parent.name
            tail = "\n".join(text.splitlines()[-25:])
            parts.append(f"--- rank {rank} stderr (last lines) ---\n{tail}")
    return "\n".join(parts)


def run_on_ranks(
    target: str,
    nproc: int,
    timeout_s: float = 300.0,
    env: Optional[dict] = None,
    **kwargs: Any,
) -> list:
    """Run ``target(**kwargs)`` on ``nproc`` ranks; return each rank's result."""
    with tempfile.TemporaryDirectory(prefix="multirank-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
        log_dir = tmp_path / "logs"
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "--max_restarts=0",
            f"--log-dir={log_dir}",
            "--redirects=3",
            "--tee=3",
            "-m", "tests.support.rank_entry",
            target, str(tmp_path),
        ]
        run_env = {**standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), **(env or {})}
        run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), run_env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=run_env, start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise MultiRankError(
                f"{target} on {nproc} ranks did not finish within {timeout_s:.0f}s "
                f"(a rank is probably stuck in a collective)\n{_rank_logs(log_dir)}\n"
                f"{output[-3000:]}"
            ) from None
        if proc.returncode != 0:
            raise MultiRankError(
                f"{target} on {nproc} ranks failed (exit {proc.returncode})\n"
                f"{_rank_logs(log_dir)}\n--- torchrun output (last lines) ---\n{output[-3000:]}"
            )
        results = []
        for rank in range(nproc):
            result_file = tmp_path / f"result_{rank}.json"
            results.append(json.loads(result_file.read_text()))
        return results
