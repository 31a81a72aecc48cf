"""Sizes that follow from ``parallel.*`` the way megatron-core derives them.

The validation and the planner both need them, and must agree with megatron-core, so
they are written down once here.
"""
from __future__ import annotations

from typing import Any


def expert_tensor_parallel(parallel: Any) -> int:
    """``parallel.etp``; null means the experts are split like the dense layers (etp = tp)."""
    return parallel.tp if parallel.etp is None else parallel.etp


def model_parallel_size(parallel: Any) -> int:
    """Ranks one replica of the dense parameters spans: tp*pp*cp (the rest is data parallel)."""
    return parallel.tp * parallel.pp * parallel.cp
