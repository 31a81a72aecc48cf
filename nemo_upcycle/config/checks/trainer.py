"""The ``trainer.*`` settings: checkpointing and the router-collapse guards."""
from __future__ import annotations

from typing import Any


def checkpoint_problems(cfg: Any) -> list[str]:
    every = cfg.trainer.checkpoint_every_n_steps
    if every >= 0:
        return []
    return [f"trainer.checkpoint_every_n_steps={every} must be >= 0 (0 = save no checkpoint)"]


def guard_problems(cfg: Any) -> list[str]:
    """The optional router-collapse thresholds (nemo_upcycle/training/guards.py) must be able
    to fire at all, and must not fire on every step."""
    tr, moe = cfg.trainer, cfg.moe
    dropped, load = tr.guard_max_dropped_fraction, tr.guard_max_load_ratio
    if dropped is None and load is None:
        return []
    if moe.num_experts == 0:
        return ["trainer.guard_max_dropped_fraction / guard_max_load_ratio watch the routers, and "
                "moe=dense has none: set them to null"]
    problems = []
    if dropped is not None:
        if not 0.0 <= dropped < 1.0:
            problems.append(f"trainer.guard_max_dropped_fraction={dropped} must be in [0, 1) (null = off)")
        elif moe.capacity_factor is None:
            problems.append(
                f"trainer.guard_max_dropped_fraction={dropped} can never fire: moe.capacity_factor=null "
                "is dropless; set a capacity factor or the guard to null"
            )
    if load is not None:
        # Each token picks top-k distinct experts, so the busiest expert gets at most 1/k of
        # the assignments: E/k times its fair share (the same ratio counted in fine experts).
        ceiling = moe.num_experts / moe.topk if moe.topk else float("inf")
        if not 1.0 <= load < ceiling:
            problems.append(
                f"trainer.guard_max_load_ratio={load} must be >= 1 (1 = perfectly balanced) and below "
                f"moe.num_experts/moe.topk = {ceiling:g}, the most the busiest expert can get (null = off)"
            )
    return problems
