"""Build a shared file once: rank 0 builds it while the other ranks wait for the result.

The waiting is on the finished files, not on a collective: a build that fails on rank 0
cannot leave the other ranks hanging inside one (they time out, naming what they waited
for, or torchrun stops them once rank 0 exits).
"""
from __future__ import annotations

import time
from typing import Callable

from nemo_upcycle.platform.launcher_env import read_launch_env


def build_on_rank0(ready: Callable[[], bool], build: Callable[[], object], what: str,
                   timeout_s: float = 900.0, poll_s: float = 1.0) -> None:
    """Unless ``ready()``, rank 0 runs ``build()``; every rank returns once ``ready()`` holds."""
    if ready():
        return
    rank = read_launch_env().rank
    if rank == 0:
        build()
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: {what} did not finish within {timeout_s:.0f}s")
        time.sleep(poll_s)
