"""Safetensors shards written by hand, one tensor at a time.

A shard is an 8-byte header length, the JSON header (every tensor's dtype, shape and byte
range), then each tensor's bytes in header order. Knowing every shape up front, the header
is written first and each tensor is produced, written and dropped before the next: peak
memory is one tensor, whatever the model's size.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch

from nemo_upcycle.checkpoint.sources.hf_safetensors import INDEX_FILE

ST_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class ShardWriter:
    """One safetensors file, written tensor by tensor after its header."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.expected = {name: header[name] for name, _, _ in entries}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)
        self.data_start = 8 + len(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self.expected[name]
        assert self.file.tell() - self.data_start == info["data_offsets"][0], name
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        self.file.write(memoryview(flat.numpy()))

    def close(self) -> None:
        self.file.close()


def plan_shards(shapes: dict[str, tuple], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard below ``max_shard_bytes`` unless one tensor is larger."""
    size = torch.empty((), dtype=dtype).element_size()
    shards, current, current_bytes = [], [], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        if current and current_bytes + n > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += n
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names: one ``model.safetensors``, or ``model-0000i-of-0000n``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(folder: Path, shapes: dict[str, tuple], dtype: torch.dtype, max_shard_bytes: int,
                 tensor_of: Callable[[str], torch.Tensor], progress: bool = True) -> tuple[int, int]:
    """Write every tensor of ``shapes`` (made by ``tensor_of(name)``) into ``folder``, with the
    index when there are several shards. Returns (shards, bytes written)."""
    from nemo_upcycle.util.progress import progress_bar

    shards = plan_shards(shapes, dtype, max_shard_bytes)
    weight_map, total_bytes = {}, 0
    with progress_bar(total=len(shapes), desc="export", unit="tensor", disable=not progress) as bar:
        for file_name, members in zip(shard_names(len(shards)), shards):
            writer = ShardWriter(folder / file_name, [(n, shapes[n], dtype) for n in members])
            try:
                for name in members:
                    tensor = tensor_of(name)
                    writer.write(name, tensor)
                    total_bytes += tensor.numel() * tensor.element_size()
                    weight_map[name] = file_name
                    del tensor  # one tensor in memory at a time
                    bar.update(1)
            finally:
                writer.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return len(shards), total_bytes
