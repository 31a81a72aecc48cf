"""Optional symmetry breaking between the identical experts at step 0.

* Gaussian noise: each expert's weights get N(0, std^2) noise.
* Drop-Upcycling (Nakamura et al., 2025): in each expert, a fraction r of the
  intermediate channels (rows of gate/up, columns of fc2) is re-initialised from a normal
  with the original weight's std, so experts start partly different.

Random draws are seeded by (seed, layer, expert) and, for the values, by the shard's
offset, so every rank that holds the same expert shard (expert-data-parallel replicas)
draws the same numbers without any communication. The draws are made on the host (a
seeded CPU generator gives the same numbers on every machine) and then moved to the
weights' device (nemo_upcycle.platform.device.like).
"""
from __future__ import annotations

import torch

from nemo_upcycle.platform.device import like
from nemo_upcycle.upcycle.router_init import layer_generator

_NOISE_STREAM = 0x0015_0000
_DROP_STREAM = 0x0D20_0000


def _expert_generator(seed: int, layer: int, expert: int, stream: int, extra: int = 0) -> torch.Generator:
    return layer_generator(seed, layer * 4099 + expert * 7 + extra, stream)


def add_noise(weight: torch.Tensor, std: float, seed: int, layer: int, expert: int, shard: int) -> None:
    gen = _expert_generator(seed, layer, expert, _NOISE_STREAM, shard)
    with torch.no_grad():
        weight.add_(like(torch.randn(weight.shape, generator=gen), weight) * std)


def dropped_channels(seed: int, layer: int, expert: int, width: int, ratio: float) -> torch.Tensor:
    """Global intermediate-channel indices (of the expert's width) to re-initialise."""
    gen = _expert_generator(seed, layer, expert, _DROP_STREAM)
    count = int(round(width * ratio))
    return torch.randperm(width, generator=gen)[:count].sort().values


def reinit_channels(
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    channels: torch.Tensor,
    local_offset: int,
    seed: int,
    layer: int,
    expert: int,
) -> int:
    """Re-initialise the given global channels that fall in this shard; returns how many."""
    local_width = fc2.shape[1]
    local = channels[(channels >= local_offset) & (channels < local_offset + local_width)] - local_offset
    local = local.to(fc2.device)
    if local.numel() == 0:
        return 0
    gen = _expert_generator(seed, layer, expert, _DROP_STREAM, 1 + local_offset)
    with torch.no_grad():
        gate_std, up_std = fc1[:local_width].float().std(), fc1[local_width:].float().std()
        down_std = fc2.float().std()
        n, h = local.numel(), fc1.shape[1]
        fc1[local] = like(torch.randn(n, h, generator=gen).to(gate_std.device) * gate_std, fc1)
        fc1[local_width + local] = like(torch.randn(n, h, generator=gen).to(up_std.device) * up_std, fc1)
        fc2[:, local] = like(torch.randn(fc2.shape[0], n, generator=gen).to(down_std.device) * down_std, fc2)
    return int(local.numel())
