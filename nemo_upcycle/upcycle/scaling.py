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

from typing import Any

from nemo_upcycle.upcycle.spec import UpcycleSpec


def scaling_mode(cfg: Any) -> str:
    """"none", "fc2_granularity" or "cube_root"."""
    return UpcycleSpec.of(cfg).scaling_mode()


def scale_factors(cfg: Any) -> tuple[float, float]:
    """(factor for fc1, factor for fc2)."""
    return UpcycleSpec.of(cfg).scale_factors()
