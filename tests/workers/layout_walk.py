"""Run ``verify`` at many layouts inside one launch (see tests/test_layout_walk.py).

A torchrun launch costs ~10 s of imports and rendezvous per rank, a verify at a tiny model
about a second: so one launch per world size walks all its layouts, rebuilding megatron's
parallel state between them (tests/workers/each_layout.py), and calls the library exactly
as ``nemo_upcycle.verify`` does.
"""
from __future__ import annotations

import time


def verify_each(base: list[str], layouts: list[list[str]]) -> list[dict]:
    """``verify`` at ``base + layout`` for each layout: its verdict, on every rank."""
    from tests.workers.each_layout import each

    runs = {str(i): {"base": base, "layout": layout} for i, layout in enumerate(layouts)}
    return list(each("tests.workers.layout_walk:verify_at", runs).values())


def verify_at(base: list[str], layout: list[str]) -> dict:
    """What ``nemo_upcycle.verify`` does at ``base + layout``, and its verdict."""
    from nemo_upcycle.checkpoint.dense_source import resolve_dense_model
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.config.validate import validate
    from nemo_upcycle.platform.launcher_env import launch_world_size
    from nemo_upcycle.upcycle.verify import run_verify, verdict

    started = time.monotonic()
    cfg = compose_config(base + layout)
    resolve_dense_model(cfg)  # what the CLI's validated() does before anything is built
    validate(cfg, launch_world_size(), "verify")
    result = run_verify(cfg)
    lines, failed = verdict(result)
    return {"layout": layout, "failed": failed, "lines": lines, "max": result["max"],
            "tolerance": result["tolerance"], "import": result["import"],
            "import_tolerance": result["import_tolerance"], "seconds": round(time.monotonic() - started, 2)}
