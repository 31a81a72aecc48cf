"""Semantic checks of a composed job configuration.

Hydra's schemas catch typos and wrong types; these checks catch combinations that
megatron-core would reject late (or, worse, accept and compute something else). They run
before any weight is read or any file is written, and report every problem at once, each
naming the offending values and the fix. The checks themselves live in
:mod:`nemo_upcycle.config.checks`, one module per concern.
"""
from __future__ import annotations

from typing import Any, Optional

from nemo_upcycle.config.checks.data import data_problems
from nemo_upcycle.config.checks.evaluation import evaluation_problems
from nemo_upcycle.config.checks.moe import moe_problems
from nemo_upcycle.config.checks.parallel import (
    dense_layout_problems,
    parallel_size_problems,
    pipeline_problems,
    sequence_parallel_problems,
    tensor_parallel_problems,
    world_size_problems,
)
from nemo_upcycle.config.checks.router import router_problems
from nemo_upcycle.config.checks.sequence import context_parallel_problems, sequence_length_problems
from nemo_upcycle.config.checks.trainer import (checkpoint_problems, guard_problems, precision_problems,
                                                 recompute_problems)
from nemo_upcycle.errors import UserError


class ConfigError(UserError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


# In the order the messages are listed: the layout against the model, then each group.
CHECKS = (
    tensor_parallel_problems,
    pipeline_problems,
    sequence_parallel_problems,
    moe_problems,
    router_problems,
    dense_layout_problems,
    precision_problems,
    recompute_problems,
    checkpoint_problems,
    guard_problems,
    evaluation_problems,
    data_problems,
)
# Checks that depend on what the command does with the model (see checks/sequence.py).
COMMAND_CHECKS = (context_parallel_problems, sequence_length_problems)
COMMANDS = ("train", "verify", "evaluate", "plan")


def collect_problems(cfg: Any, world_size: Optional[int] = None, command: str = "train") -> list[str]:
    """Every problem with ``cfg`` (an OmegaConf node or the dataclass), as sentences.

    ``world_size``: the ranks the launcher started (None: only ``parallel.world_size``, if
    set, is checked against the layout). ``command``: one of :data:`COMMANDS`, what will be
    run (each reads its own sequence length; the planner runs nothing here).
    """
    assert command in COMMANDS, command
    problems = parallel_size_problems(cfg.parallel)
    if problems:
        return problems  # every other check divides by these sizes
    for check in CHECKS:
        problems += check(cfg)
    for command_check in COMMAND_CHECKS:
        problems += command_check(cfg, command)
    return problems + world_size_problems(cfg, world_size)


def validate(cfg: Any, world_size: Optional[int] = None, command: str = "train") -> None:
    """Raise :class:`ConfigError` listing every problem with ``cfg``."""
    problems = collect_problems(cfg, world_size, command)
    if problems:
        raise ConfigError(problems)
