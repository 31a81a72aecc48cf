"""When must the upcycled model compute exactly the dense model's function at step 0?

With identical experts, top-k-then-softmax weights sum to 1, so the MoE output equals the
dense FFN's output up to floating-point rounding (for granular experts, after the fc2
scaling in :mod:`nemo_upcycle.upcycle.scaling`). Other settings change the function on
purpose (softmax-then-top-k, sinkhorn, noise, partial re-initialisation) or drop tokens
(a capacity factor), so there is no tolerance to check, only a difference to report.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from nemo_upcycle.upcycle.spec import UpcycleSpec

# Absolute tolerance on logits for an exact configuration, by parameter dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.5e-1}


def inexact_reason(cfg: Any) -> Optional[str]:
    """Why the upcycled model is not expected to match the dense one, or None if it is."""
    moe, spec = cfg.moe, UpcycleSpec.of(cfg)
    if not spec.is_moe:
        return None
    if moe.capacity_factor is not None:
        return f"moe.capacity_factor={moe.capacity_factor} drops tokens"
    if moe.expert_noise_std:
        return f"moe.expert_noise_std={moe.expert_noise_std} perturbs the experts"
    if moe.drop_upcycling_ratio:
        return f"moe.drop_upcycling_ratio={moe.drop_upcycling_ratio} re-initialises channels"
    if not spec.router.weights_sum_to_one:
        return f"router.type={spec.router.type}: the chosen weights do not sum to 1"
    if not spec.router.exact_at_step0(spec.topk):
        return f"router.type={spec.router.type} with top-1: the one chosen weight is not 1"
    mode = spec.scaling_mode()
    if spec.granularity > 1 and mode != "fc2_granularity":
        return f"granular experts with moe.weight_scaling={spec.weight_scaling}"
    if spec.granularity == 1 and mode != "none":
        return f"moe.weight_scaling={spec.weight_scaling} rescales the experts"
    return None


def logit_tolerance(cfg: Any, dtype: torch.dtype) -> Optional[float]:
    return None if inexact_reason(cfg) else TOLERANCE.get(dtype, 1.5e-1)
