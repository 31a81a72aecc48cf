"""When must the upcycled model compute exactly the dense model's function at step 0?

With identical experts, top-k-then-softmax weights sum to 1, so the MoE output equals the
dense FFN's output up to floating-point rounding (for granular experts, after the fc2
scaling in :mod:`nemo_upcycle.upcycle.scaling`). Other settings change the function on
purpose (softmax-then-top-k, sinkhorn, noise, partial re-initialisation) or drop tokens
(a capacity factor), so there is no tolerance to check, only a difference to report.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from nemo_upcycle.upcycle.spec import UpcycleSpec

# How far two computations of the same function may drift apart by rounding alone, on logits.
# Every layer's output carries a relative rounding error of order eps(dtype): the MoE sums its
# top-k expert outputs with probabilities that sum to 1 only up to eps, its experts see their
# tokens in other batches, tensor/expert parallelism splits the matmul sums, transformers sums
# in yet another order. The residual stream carries these errors to the logits in proportion
# to the logits' magnitude, and the independent errors of L layers add like a random walk:
#     difference ~ c * eps(dtype) * max|logit| * sqrt(L)
# (eps: torch.finfo, 2^-23 for fp32 and 2^-7 for bf16; logit magnitudes under 1 count as 1,
# the hidden states' rounding does not shrink with them). c is measured: the ratio of the
# difference to eps * max|logit| * sqrt(L), over SmolLM2-135M (30 layers, logits up to 37) and
# the tiny model (4 layers) at its 33 layouts of 2 and 4 ranks, MoE vs dense and megatron-core
# vs transformers (README, "verify's tolerances"), was at most 4.3 in fp32 (SmolLM2 at
# TP3/EP2/ETP1/SP: 1.03e-4) and 1.1 in bf16 (the tiny model vs transformers; SmolLM2 at EP2:
# 0.65, a difference of 1.03); c is that times about 3.7. bf16's ratios are
# smaller than fp32's: most bf16 rounding is the same on both sides (the same bf16 matmuls on
# the same values), only the combine and the summation orders differ. A real bug (a wrong
# expert slice, a norm left at its initial value) moves the logits by a sizeable fraction of
# their magnitude: 5-10x the bf16 tolerance and 10^5x the fp32 one on the tiny model whose FFNs
# matter (tests/test_layout_walk.py checks both bugs fail in both dtypes). On SmolLM2 the bf16
# tolerance is 6.3 on logits of 37: a bf16 verify catches gross bugs only, so check the
# upcycling of a bf16 checkpoint with trainer.precision=fp32 too (bf16 values are exact in
# fp32, and the fp32 tolerance there is 3.8e-4).
ROUNDING_FACTOR = {torch.float32: 16.0, torch.bfloat16: 4.0}


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
    if spec.routed_slices > 1 and mode != "fc2_granularity":
        return f"granular experts with moe.weight_scaling={spec.weight_scaling}"
    if spec.routed_slices == 1 and mode != "none":
        return f"moe.weight_scaling={spec.weight_scaling} rescales the experts"
    return None


def rounding_scale(dtype: torch.dtype, logit_scale: float, num_layers: int) -> float:
    """eps(dtype) x max|logit| x sqrt(layers): the size of a rounding difference on the logits."""
    return torch.finfo(dtype).eps * max(logit_scale, 1.0) * math.sqrt(num_layers)


def rounding_tolerance(dtype: torch.dtype, logit_scale: float, num_layers: int) -> float:
    """The largest logit difference rounding explains between two computations of one model."""
    return ROUNDING_FACTOR[dtype] * rounding_scale(dtype, logit_scale, num_layers)


def logit_tolerance(cfg: Any, dtype: torch.dtype, logit_scale: float) -> Optional[float]:
    """The largest MoE-vs-dense logit difference rounding explains, or None when the
    configuration is not expected to match (see :func:`inexact_reason`)."""
    if inexact_reason(cfg):
        return None
    return rounding_tolerance(dtype, logit_scale, cfg.model.num_layers)


def tolerance_rule(dtype: torch.dtype) -> str:
    """The rule, as verify prints it."""
    return f"{ROUNDING_FACTOR[dtype]:g} x eps({str(dtype).removeprefix('torch.')}) x max|logit| x sqrt(layers)"
