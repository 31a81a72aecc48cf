"""Build a shared file once: rank 0 builds it while the other ranks wait for the result.

The waiting is on the finished files, not on a collective: a build that fails on rank 0
cannot leave the other ranks hanging inside one. Every wait has a deadline: the builder's
subprocess is killed at it, the waiting ranks give up at it, and each ends the job with a
message naming what it waited for (:class:`Rank0BuildFailed`, no traceback).
"""
from __future__ import annotations

import subprocess
import time
from typing import Callable, Sequence

from nemo_upcycle.errors import UserError
from nemo_upcycle.platform.launcher_env import read_launch_env, standalone_env


class Rank0BuildFailed(UserError):
    """A build the job waited for failed or missed its deadline: printed by every rank that
    saw it (a waiting rank's message is the only word from its node), exit status 1."""

    exit_code = 1
    every_rank = True


REPORT_GRACE_S = 30.0


def build_on_rank0(ready: Callable[[], bool], build: Callable[[], object], what: str,
                   timeout_s: float = 900.0, poll_s: float = 1.0, where: str = "",
                   report_grace_s: float = REPORT_GRACE_S) -> None:
    """Unless ``ready()``, rank 0 runs ``build()``; every rank returns once ``ready()`` holds.

    ``what`` names the build, ``where`` the files the waiting ranks look for (a folder every
    rank must see: on several nodes, a shared file system).
    """
    if ready():
        return
    rank = read_launch_env().rank
    started = time.monotonic()
    if rank == 0:
        build()
        if ready():
            return
        raise Rank0BuildFailed(f"{what} finished without its result{f' in {where}' if where else ''}")
    while not ready():
        waited = time.monotonic() - started
        # Past rank 0's own deadline by a grace period: rank 0 reports first (it knows the cause).
        if waited > timeout_s + report_grace_s:
            shared = f" in {where}" if where else ""
            raise Rank0BuildFailed(
                f"rank {rank} waited {waited:.0f}s (the deadline) for rank 0 to finish {what} and found no "
                f"result{shared}. Rank 0's own message says why; if rank 0 finished, this rank does not see "
                "its files: on several nodes the folder must be on a file system every node shares "
                "(set cache_dir= or NEMO_UPCYCLE_CACHE)"
            )
        time.sleep(poll_s)


def run_build_subprocess(cmd: Sequence[str], what: str, timeout_s: float) -> None:
    """Rank 0's build as a job of its own (no launcher variable reaches it), killed at the deadline."""
    try:
        done = subprocess.run(list(cmd), env=standalone_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise Rank0BuildFailed(
            f"{what} did not finish within {timeout_s:.0f}s and was stopped: `{' '.join(cmd)}`; "
            "run that command alone to see where it stops"
        ) from None
    if done.returncode != 0:
        raise Rank0BuildFailed(f"{what} failed (exit {done.returncode}; its message is above): `{' '.join(cmd)}`")
