"""Run one rank function at several layouts inside one launch.

A torchrun launch costs seconds of imports and rendezvous per rank, a check on the tiny
model about a second: so tests that check many layouts of one world size make one launch,
and megatron's parallel state is rebuilt between the layouts (tests/workers/layout_walk.py
walks verify this way).
"""
from __future__ import annotations

import importlib


def each(check: str, runs: dict[str, dict]) -> dict[str, object]:
    """name -> ``check(**kwargs)`` for each ``name -> kwargs`` of ``runs``, in order."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    module, name = check.split(":")
    function = getattr(importlib.import_module(module), name)
    results = {}
    for run, kwargs in runs.items():
        results[run] = function(**kwargs)
        parallel_state.destroy_model_parallel()
        dist.barrier()
    return results
