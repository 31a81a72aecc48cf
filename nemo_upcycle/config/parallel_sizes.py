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


def sequence_multiple(parallel: Any) -> int:
    """What every sequence length must be a multiple of at this layout.

    Sequence parallelism scatters the sequence over the tp ranks (megatron-core:
    "First dimension of the tensor should be divisible by tensor parallel size"); context
    parallelism cuts it into 2*cp chunks, two per rank, for load balance; with both, each
    cp rank's part is scattered again, so tp*2*cp (the padding megatron-core's own
    multimodal context-parallel helper uses).
    """
    multiple = parallel.tp if parallel.sp else 1
    if parallel.cp > 1:
        multiple *= 2 * parallel.cp
    return multiple
