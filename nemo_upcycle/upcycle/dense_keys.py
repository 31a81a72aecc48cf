"""Which key of a dense megatron-core checkpoint holds tensor ``name`` of layer ``layer``.

A checkpoint stores layers stacked (``decoder.layers.mlp.linear_fc1.weight`` of shape
(L, ...)) or one key per layer (``decoder.layers.3.mlp...``), with or without NeMo 2's
``module.`` prefix, under either layer spec's names. How such keys are spelled is
:mod:`nemo_upcycle.model.megatron_keys`'s job (it also writes them, for the safetensors
source and the exporter); this resolver only *looks them up* in a checkpoint that exists,
tensor by tensor (a checkpoint may mix stacked and per-layer keys), and says clearly what is
missing or inconsistent.
"""
from __future__ import annotations

from typing import Mapping, Optional

from nemo_upcycle.model.megatron_keys import MegatronNaming, parse_megatron_key
from nemo_upcycle.errors import DenseCheckpointMismatch


class DenseKeyResolver:
    """Maps (layer, name) of the model to the dense checkpoint's key and offset prefix."""

    def __init__(self, dense_shapes: Mapping[str, tuple[int, ...]], num_layers: Optional[int]):
        self.shapes = dense_shapes
        self.num_layers = num_layers  # None: not known yet (reading the architecture)
        found = MegatronNaming.of_keys(dense_shapes)
        self.prefix = found.prefix
        # An MoE checkpoint written with the TE spec names its MoE layers' norms its own way.
        self._stacked = MegatronNaming(True, self.prefix, found.layer_naming, found.moe_layers)
        self._per_layer = MegatronNaming(False, self.prefix, found.layer_naming, found.moe_layers)

    def has(self, layer: Optional[int], name: str) -> bool:
        try:
            self.resolve(layer, name)
        except DenseCheckpointMismatch:
            return False
        return True

    def layer_count(self, name: str) -> int:
        """How many layers hold ``name`` (stacked: the leading axis; else the per-layer keys)."""
        stacked, _ = self._stacked.key(0, name, None)
        if stacked in self.shapes:
            return self.shapes[stacked][0]
        layers = set()
        for key in self.shapes:
            parsed, _, layer = parse_megatron_key(key)
            if key.startswith(self.prefix) and parsed == name and layer >= 0:
                layers.add(layer)
        if not layers:
            raise DenseCheckpointMismatch(f"the dense checkpoint has no tensor {name!r} in any layer")
        return max(layers) + 1

    def resolve(self, layer: Optional[int], name: str) -> tuple[str, tuple[int, ...], bool]:
        """(checkpoint key, leading offsets, whether that key has a stacked layer axis)."""
        if layer is None:
            key, _ = self._stacked.key(None, name, None)
            if key in self.shapes:
                return key, (), False
            raise DenseCheckpointMismatch(f"the dense checkpoint has no tensor {key!r}")
        stacked, lead = self._stacked.key(layer, name, None)
        if stacked in self.shapes:
            rows = self.shapes[stacked][0]
            if self.num_layers is not None and rows != self.num_layers:
                raise DenseCheckpointMismatch(
                    f"the dense checkpoint has {rows} layers ({stacked} has shape "
                    f"{list(self.shapes[stacked])}) but model.num_layers={self.num_layers}"
                )
            return stacked, lead, True
        per_layer, lead = self._per_layer.key(layer, name, None)
        if per_layer in self.shapes:
            return per_layer, lead, False
        raise DenseCheckpointMismatch(
            f"the dense checkpoint has no tensor for layer {layer} {name!r} "
            f"(looked for {stacked!r} and {per_layer!r})"
        )

    def dense_shape(self, layer: Optional[int], name: str) -> tuple[int, ...]:
        """The tensor's shape for one layer (a stacked key's layer axis dropped)."""
        key, _, stacked = self.resolve(layer, name)
        shape = self.shapes[key]
        return shape[1:] if stacked else shape
