"""Rank, world size and rendezvous read from torchrun or Slurm environments.

The rendezvous port is never a fixed number: two jobs on one node that both used 29500
joined each other's rendezvous (one job's rank trained the other's run, the other hung).
:func:`rendezvous_port` says where the port comes from.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,007],cpu01`` -> ``gpu003``."""
    match = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


# Slurm jobs derive their port from the job id: SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN.
# 20000-39999 lies above the common service ports; two jobs sharing a node get different
# ports unless their ids differ by a multiple of 20000 (then set MASTER_PORT by hand).
# scripts/slurm/upcycle.sbatch computes the same number in bash.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


def slurm_job_port(job_id: str | int) -> int:
    """The rendezvous port of Slurm job ``job_id`` (the same for every rank of the job)."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def rendezvous_port(env: Mapping[str, str], launcher: str) -> int:
    """The port of this job's rendezvous.

    MASTER_PORT from the environment always wins (torchrun sets it for its ranks; a user may
    set it). Else, inside a Slurm job, the job's own port (every rank and node computes the
    same one from SLURM_JOB_ID). Else a single process takes a port that is free now:
    nothing else has to agree on it.
    """
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    if env.get("SLURM_JOB_ID"):
        return slurm_job_port(env["SLURM_JOB_ID"])
    if launcher == "torchrun":
        return 29500  # torchrun always exports MASTER_PORT; torch's own default otherwise
    from nemo_upcycle.util.ports import free_port

    return free_port()


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; srun sets SLURM_PROCID/SLURM_NTASKS/...

    torchrun wins when both are present (torchrun inside an sbatch allocation).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=rendezvous_port(env, "torchrun"),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=rendezvous_port(env, "slurm"),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), rendezvous_port(env, "single"), "single")


def export_torch_env(launch: LaunchEnv) -> None:
    """Write the variables torch.distributed's env:// and NeMo/Lightning read."""
    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )


def launch_world_size() -> int:
    return read_launch_env().world_size


def is_rank0() -> bool:
    return read_launch_env().rank == 0


def print_rank0(message: str) -> None:
    if is_rank0():
        print(message, flush=True)
