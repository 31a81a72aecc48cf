"""What every dense weight source speaks: slice requests, read statistics, the protocol.

A source answers two questions: which tensors exist (global shapes, before any weight is
read) and "copy this global slice of tensor K into this local tensor". The upcycling
engine only talks to sources through :class:`SliceRequest`, so the same plan serves a
megatron-core / NeMo 2 distributed checkpoint (:mod:`nemo_upcycle.checkpoint.sources.torch_dist`)
and a Hugging Face safetensors folder (:mod:`nemo_upcycle.checkpoint.sources.hf_safetensors`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class SliceRequest:
    """Copy ``source[key][offsets : offsets + target.shape]`` into ``target``."""

    key: str
    offsets: tuple[int, ...]
    target: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.target.shape)

    @property
    def numel(self) -> int:
        return self.target.numel()


@dataclass
class ReadStats:
    """What a read cost: bytes actually read from storage and elements delivered."""

    bytes_read: int = 0
    chunks_read: int = 0
    elements_delivered: int = 0
    keys: set = field(default_factory=set)


class DenseSource(Protocol):
    path: Path

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read(self, requests: list[SliceRequest]) -> ReadStats: ...


def narrow_tensor_by_index(tensor: torch.Tensor, offsets, sizes) -> torch.Tensor:
    """``tensor[offsets[0]:offsets[0]+sizes[0], ...]`` as a view."""
    for dim, (start, length) in enumerate(zip(offsets, sizes)):
        if start or length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, length)
    return tensor

