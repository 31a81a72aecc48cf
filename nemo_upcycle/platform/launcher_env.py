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
    if launch.launcher != "torchrun":
        # torchrun's agent serves this store to its own workers only; a process that is not
        # one of them (its parent was) would wait as a client on a port nobody serves.
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )


# What a launcher tells its processes about the job they belong to: who they are (a rank or
# world size of any scope) and where the rendezvous is. Matched by prefix, so that a variable
# this list never named is dropped too: a child started with torchrun's
# TORCHELASTIC_USE_AGENT_STORE=True connected as a store *client* to a port no server
# would ever open and waited forever (issue 26). TORCHELASTIC_ (torchrun's agent), SLURM_
# (srun/sbatch; Lightning also picks its cluster environment from them), PMI_/PMIX_/OMPI_
# (MPI launchers, srun --mpi), LSB_/JSM_NAMESPACE_ (LSF, which Lightning detects), MASTER_
# (the rendezvous address and port).
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "SLURM_", "PMI_", "PMIX_", "OMPI_", "LSB_", "JSM_NAMESPACE_", "MASTER_")
# torchrun's unprefixed ones: RANK, WORLD_SIZE and their LOCAL_/GROUP_/ROLE_/NODE_ forms, ROLE_NAME.
_RANK_VARIABLE = re.compile(r"^((LOCAL|GROUP|ROLE|NODE)_)?(RANK|WORLD_SIZE)$|^ROLE_NAME$")


def is_launcher_variable(name: str) -> bool:
    return name.startswith(LAUNCHER_PREFIXES) or bool(_RANK_VARIABLE.match(name))


def standalone_env(base: Optional[Mapping[str, str]] = None, **extra: str) -> dict[str, str]:
    """The environment of a process that must be a job of its own, whatever launched this one.

    Every launcher variable (:func:`is_launcher_variable`) is dropped; settings are kept:
    ``CUDA_VISIBLE_DEVICES`` (the GPUs this process was given), ``OMP_NUM_THREADS``, and
    ``NCCL_*``/``TORCH_NCCL_*`` (how collectives behave, e.g. torchrun's
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING``; they name no rank or peer). ``extra`` is added last.
    Every subprocess the package starts gets its environment from here.
    """
    env = os.environ if base is None else base
    return {**{k: v for k, v in env.items() if not is_launcher_variable(k)}, **extra}


def launch_world_size() -> int:
    return read_launch_env().world_size


def is_rank0() -> bool:
    return read_launch_env().rank == 0


def print_rank0(message: str) -> None:
    if is_rank0():
        print(message, flush=True)
