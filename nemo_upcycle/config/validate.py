"""Semantic checks of a composed job configuration.

Hydra's schemas catch typos and wrong types; these checks catch combinations that
megatron-core would reject late (or, worse, accept and compute something else). They run
before any weight is read or any file is written, and report every problem at once, each
naming the offending values and the fix. The checks themselves live in
:mod:`nemo_upcycle.config.checks`, one module per concern.
"""
from __future__ import annotations

from typing import Any, Optional

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
from nemo_upcycle.config.checks.trainer import checkpoint_problems, guard_problems
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
    checkpoint_problems,
    guard_problems,
    evaluation_problems,
)


def collect_problems(cfg: Any, world_size: Optional[int] = None) -> list[str]:
    """Every problem with ``cfg`` (an OmegaConf node or the dataclass), as sentences.

    ``world_size``: the ranks the launcher started (None: only ``parallel.world_size``, if
    set, is checked against the layout).
    """
    problems = parallel_size_problems(cfg.parallel)
    if problems:
        return problems  # every other check divides by these sizes
    for check in CHECKS:
        problems += check(cfg)
    return problems + world_size_problems(cfg, world_size)


def validate(cfg: Any, world_size: Optional[int] = None) -> None:
    """Raise :class:`ConfigError` listing every problem with ``cfg``."""
    problems = collect_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
