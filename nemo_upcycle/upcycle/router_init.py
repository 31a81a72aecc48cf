"""Router initialisation: random, identical on every rank that holds the router.

megatron-core replicates each router across TP and DP ranks. Rather than initialising on
one rank and broadcasting (cross-rank traffic), every rank draws the same numbers from a
generator seeded by (seed, layer): reproducible and communication-free.
"""
from __future__ import annotations

import torch

from nemo_upcycle.upcycle.spec import UpcycleSpec

_ROUTER_STREAM = 0x5EED_0000


def layer_generator(seed: int, layer: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream + layer)


def router_weights(seed: int, layer: int, spec: UpcycleSpec, std: float) -> torch.Tensor:
    """(E·G, H) router rows; for G > 1 each virtual group of G experts (G - S beside S shared
    slices: ``spec.routed_slices``) shares one row.

    Identical rows within a group make top-(T·G) pick whole groups, so the G slices of the
    dense FFN are always chosen together (He et al.'s virtual-group initialisation).
    """
    gen = layer_generator(seed, layer, _ROUTER_STREAM)
    rows = torch.randn(spec.coarse_experts, spec.hidden_size, generator=gen) * std
    return rows.repeat_interleave(spec.routed_slices, dim=0)
