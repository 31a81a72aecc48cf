"""Expert weight scaling, where the routing would otherwise shrink the FFN's output.

* Top-k then softmax with granular experts (G > 1): the G slices of a chosen group share
  the group's probability equally, so the group contributes FFN(x)/G. Multiplying fc2 by G
  makes the upcycled model exactly the dense model (any router, since the group's G rows
  are identical).
* Softmax then top-k: the chosen probabilities sum to about T*G/(E*G) = T/E at step 0, so
  the output shrinks by that factor. He et al. (2024) scale each of the three GLU matrices
  by the cube root of E*G/T (their E*G^2/T with T counted in fine-grained experts); with a
  uniform router this gives exactly (E*G/T) x the GLU's output when the activation is
  linear, and approximately so for SiLU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemo_upcycle.upcycle.spec import UpcycleSpec


def scaling_mode(spec: "UpcycleSpec") -> str:
    """"none", "fc2_granularity" or "cube_root"."""
    if not spec.is_moe or spec.weight_scaling == "none":
        return "none"
    if spec.weight_scaling == "cube_root":
        return "cube_root"
    mode = spec.router.auto_scaling
    if mode == "fc2_granularity" and spec.granularity == 1:
        return "none"
    return mode


def scale_factors(spec: "UpcycleSpec") -> tuple[float, float]:
    """(factor for fc1, factor for fc2)."""
    mode = scaling_mode(spec)
    if mode == "fc2_granularity":
        return 1.0, float(spec.granularity)
    if mode == "cube_root":
        # He et al.'s E·G²/T with T counted in fine-grained experts: (E·G/T)^(1/3), T coarse.
        factor = (spec.num_experts / spec.coarse_topk) ** (1.0 / 3.0)
        return factor, factor
    return 1.0, 1.0
