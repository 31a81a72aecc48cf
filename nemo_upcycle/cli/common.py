"""What every entry point shares: the config folder, rank-0 printing and the one exit convention.

A :class:`~nemo_upcycle.errors.UserError` anywhere ends the command with its message and
exit status 2, no traceback (:func:`user_errors`); anything else is a bug and keeps its
traceback. Exits go through :func:`fail` (``os._exit``): the other ranks may sit inside a
collective, and an orderly shutdown would wait for them; torchrun stops them once this
rank is gone. A command that completes leaves the same way (:func:`run_command`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from nemo_upcycle.checkpoint.sources.dense_source import resolve_dense_model  # noqa: F401  (for the commands)
from nemo_upcycle.config.compose import CONFIG_DIR  # noqa: F401  (re-exported for hydra.main)
from nemo_upcycle.errors import UserError
from nemo_upcycle.util.fast_exit import exit_process
from nemo_upcycle.platform.launcher_env import (  # noqa: F401  (for the commands)
    is_rank0, launch_world_size, print_rank0, read_launch_env)


def set_up_console(cfg) -> None:
    """The project's messages once (rank 0), library chatter kept for the log file; see
    nemo_upcycle/platform/console.py. ``verbose=true`` shows everything as the libraries print it."""
    from nemo_upcycle.platform.console import quiet_console as setup

    setup(read_launch_env().rank, verbose=bool(cfg.verbose))


def fail(code: int) -> None:
    """Exit now, without waiting on other ranks (they fail the same way, or torchrun stops them)."""
    exit_process(code)


def run_command(main) -> None:
    """``python -m nemo_upcycle.<command>``: the command's Hydra ``main``, then the same quick
    exit (nemo_upcycle/util/fast_exit.py: no seconds of teardown once everything is written)."""
    main()
    exit_process(0)


@contextlib.contextmanager
def user_errors(every_rank: bool = False) -> Iterator[None]:
    """A user error is one clear message (from rank 0, or from every rank) and exit status 2."""
    from nemo_upcycle.config.validate import ConfigError

    try:
        yield
    except UserError as err:
        if every_rank or err.every_rank or is_rank0() or isinstance(err, ConfigError):
            print(f"error: {err}", file=sys.stderr, flush=True)
        fail(err.exit_code)


@contextlib.contextmanager
def validated(cfg, world_size: int, command: str = "train") -> Iterator[None]:
    """Read the dense model's architecture and validate ``cfg`` for ``command`` before the body runs.

    A training relaunch whose log_dir holds a checkpoint takes the architecture from that
    checkpoint instead: after the first save the dense checkpoint is not needed any more.
    """
    from omegaconf import OmegaConf

    from nemo_upcycle.config.validate import validate

    with user_errors():
        if not OmegaConf.missing_keys(cfg.model):
            # A named model states its whole architecture: refuse a bad config before the dense
            # checkpoint is opened (the embedded model's first use imports it: ~50 s, 0.5 GB).
            validate(cfg, world_size, command)
        if command == "train":
            from nemo_upcycle.training.job import adopt_checkpoint_to_resume

            if adopt_checkpoint_to_resume(cfg) is None:
                resolve_dense_model(cfg)
        else:
            resolve_dense_model(cfg)
        validate(cfg, world_size, command)
        yield
