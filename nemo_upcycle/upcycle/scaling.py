"""Expert weight scaling, where the routing would otherwise shrink the FFN's output.

* Top-k then softmax with granular experts (G > 1): the G slices of a chosen group share
  the group's probability equally, so the group contributes FFN(x)/G. Multiplying fc2 by G
  makes the upcycled model exactly the dense model (any router, since the group's G rows
  are identical). Beside shared slices a group holds G - S slices: the same with G - S
  (``group_slices`` below: UpcycleSpec.routed_slices).
* Softmax then top-k: the chosen probabilities sum to about T*G/(E*G) = T/E at step 0, so
  the output shrinks by that factor. He et al. (2024) scale each of the three GLU matrices
  by the cube root of E*G/T (their E*G^2/T with T counted in fine-grained experts); with a
  uniform router this gives exactly (E*G/T) x the GLU's output when the activation is
  linear, and approximately so for SiLU.
"""
from __future__ import annotations


def scaling_mode(weight_scaling: str, auto_scaling: str, coarse_experts: int, group_slices: int) -> str:
    """"none", "fc2_granularity" or "cube_root": ``moe.weight_scaling`` ("auto" | "none" |
    "cube_root"), where "auto" is the router's own rule (``auto_scaling`` of its router row);
    a dense model (``coarse_experts`` E = 0) is never scaled."""
    if coarse_experts <= 0 or weight_scaling == "none":
        return "none"
    if weight_scaling == "cube_root":
        return "cube_root"
    if auto_scaling == "fc2_granularity" and group_slices == 1:
        return "none"
    return auto_scaling


def scale_factors(mode: str, num_experts: int, coarse_topk: int, group_slices: int) -> tuple[float, float]:
    """(factor for fc1, factor for fc2) of ``mode`` (:func:`scaling_mode`), for E·G routed experts
    (``num_experts``) routed top-T (``coarse_topk``), each group holding ``group_slices``."""
    if mode == "fc2_granularity":
        return 1.0, float(group_slices)
    if mode == "cube_root":
        # He et al.'s E·G²/T with T counted in fine-grained experts: (E·G/T)^(1/3), T coarse.
        factor = (num_experts / coarse_topk) ** (1.0 / 3.0)
        return factor, factor
    return 1.0, 1.0
