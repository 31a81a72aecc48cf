"""Which layers of the dense model become MoE layers (``moe.layers``)."""
from __future__ import annotations

from typing import Any

from nemo_upcycle.errors import UserError


class MoELayerSpecError(UserError):
    pass


def moe_layer_indices(spec: Any, num_layers: int) -> list[int]:
    """Resolve ``moe.layers`` to sorted global layer indices.

    ``"all"``; ``"every_<k>"`` (layers whose index is divisible by k, as megatron-core's
    ``moe_layer_freq=k``); or an explicit list of indices.
    """
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec.startswith("every_"):
            try:
                k = int(spec[len("every_"):])
            except ValueError:
                k = 0
            if k < 1:
                raise MoELayerSpecError(
                    f"moe.layers={spec!r}: expected every_<k> with an integer k >= 1"
                )
            return list(range(0, num_layers, k))
        raise MoELayerSpecError(
            f"moe.layers={spec!r}: expected 'all', 'every_<k>' or a list of layer indices"
        )
    try:
        indices = sorted({int(i) for i in spec})
    except (TypeError, ValueError):
        raise MoELayerSpecError(
            f"moe.layers={spec!r}: expected 'all', 'every_<k>' or a list of layer indices"
        ) from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise MoELayerSpecError(
            f"moe.layers contains {bad}, out of range for model.num_layers={num_layers} "
            f"(valid indices 0..{num_layers - 1})"
        )
    return indices


def moe_layer_pattern(spec: Any, num_layers: int) -> list[int]:
    """megatron-core's ``moe_layer_freq`` list: 1 for an MoE layer, 0 for a dense one."""
    chosen = set(moe_layer_indices(spec, num_layers))
    return [1 if i in chosen else 0 for i in range(num_layers)]
