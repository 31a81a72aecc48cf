"""Run ``verify`` at many layouts inside one launch (see tests/test_layout_walk.py).

A torchrun launch costs ~10 s of imports and rendezvous per rank, a verify at a tiny model
about a second: so one launch per world size walks all its layouts, rebuilding megatron's
parallel state between them (tests/workers/each_layout.py), and calls the library exactly
as ``nemo_upcycle.verify`` does.
"""
from __future__ import annotations

import time
from typing import Optional


def verify_at(base: list[str], layout: list[str], breakage: Optional[str] = None) -> dict:
    """What ``nemo_upcycle.verify`` does at ``base + layout``, and its verdict; with
    ``breakage`` (a name of :data:`BREAKAGES`), of an upcycling with that bug put in."""
    from unittest import mock

    from nemo_upcycle.checkpoint.sources.dense_source import resolve_dense_model
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.config.validate import validate
    from nemo_upcycle.platform.launcher_env import launch_world_size
    from nemo_upcycle.upcycle import engine
    from nemo_upcycle.upcycle.step0_check import run_verify, verdict

    started = time.monotonic()
    cfg = compose_config(base + layout)
    resolve_dense_model(cfg)  # what the CLI's validated() does before anything is built
    validate(cfg, launch_world_size(), "verify")
    if breakage is None:
        result = run_verify(cfg)
    else:
        upcycle = engine.upcycle_from_dense

        def broken_upcycle(chunks, cfg, source):
            report = upcycle(chunks, cfg, source)
            BREAKAGES[breakage](chunks)
            return report

        with mock.patch.object(engine, "upcycle_from_dense", broken_upcycle):
            result = run_verify(cfg)
    lines, failed = verdict(result)
    return {"layout": layout, "breakage": breakage, "failed": failed, "lines": lines, "max": result["max"],
            "mean": result["mean"], "logit_scale": result["logit_scale"], "dtype": str(result["dtype"]),
            "tolerance": result["tolerance"], "import": result["import"],
            "import_tolerance": result["import_tolerance"], "seconds": round(time.monotonic() - started, 2)}


def _first_moe_layer(chunks):
    """The first MoE layer of this rank's chunks (None for the dense model)."""
    return next((layer for chunk in chunks for layer in chunk.decoder.layers if hasattr(layer.mlp, "router")), None)


def _swap_gate_and_up(chunks) -> None:
    """A wrong expert slice: local expert 0 of the first MoE layer reads the up projection's
    rows where the gate's belong (and back), an offset bug in the plan's slice arithmetic."""
    import torch

    layer = _first_moe_layer(chunks)
    if layer is not None:
        weight = layer.mlp.experts.local_experts[0].linear_fc1.weight
        half = weight.shape[0] // 2
        with torch.no_grad():
            weight.copy_(torch.cat([weight[half:], weight[:half]]))


def _norm_at_init(chunks) -> None:
    """A norm the upcycling never wrote: the first MoE layer's pre-MLP norm at megatron's 1.0."""
    import torch

    layer = _first_moe_layer(chunks)
    if layer is not None:
        with torch.no_grad():
            layer.pre_mlp_layernorm.weight.fill_(1.0)


def _shared_share_off(chunks) -> None:
    """A wrong shared/routed split: the first MoE layer's shared expert output 1.5 times its share."""
    import torch

    layer = _first_moe_layer(chunks)
    if layer is not None:
        with torch.no_grad():
            layer.mlp.shared_experts.linear_fc2.weight.mul_(1.5)


BREAKAGES = {"expert_slice": _swap_gate_and_up, "norm_at_init": _norm_at_init, "shared_share": _shared_share_off}
