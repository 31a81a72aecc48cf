"""Shared plumbing of the Hydra entry points: config location, validation, clean failure."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from nemo_upcycle.config.compose import CONFIG_DIR  # noqa: F401  (re-exported for hydra.main)
from nemo_upcycle.config.validate import ConfigError, validate
from nemo_upcycle.errors import UserError
from nemo_upcycle.platform.launcher_env import read_launch_env


def launch_world_size() -> int:
    return read_launch_env().world_size


def is_rank0() -> bool:
    return read_launch_env().rank == 0


def print_rank0(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


def fail(code: int) -> None:
    """Exit without waiting on other ranks (they fail the same way, or torchrun stops them)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_dense_model(cfg) -> None:
    """Fill ``model=auto`` from the dense checkpoint and check it, when one is named.

    Entry points that never read a dense model (the planner with a preset) skip it.
    """
    from omegaconf import OmegaConf

    from nemo_upcycle.checkpoint.dense_source import open_dense_source

    if not OmegaConf.is_missing(cfg.model, "dense_checkpoint") or OmegaConf.is_missing(cfg.model, "name"):
        open_dense_source(cfg)


@contextlib.contextmanager
def validated(cfg, world_size: int) -> Iterator[None]:
    """Read the dense model's architecture, validate ``cfg``; a user error is one clear message, exit 2."""
    try:
        resolve_dense_model(cfg)
        validate(cfg, world_size)
        yield
    except UserError as err:
        if is_rank0() or isinstance(err, ConfigError):
            print(f"error: {err}", file=sys.stderr, flush=True)
        fail(2)
