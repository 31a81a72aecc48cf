"""Dense weight sources that can be read slice by slice.

A source answers two questions: which tensors exist (global shapes, before any weight is
read) and "copy this global slice of tensor K into this local tensor". The upcycling
engine only talks to sources through :class:`SliceRequest`, so the same plan serves a
megatron-core / NeMo 2 distributed checkpoint and a Hugging Face safetensors folder.
"""
from __future__ import annotations

import io
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


class CheckpointFormatError(ValueError):
    pass


def _torch_dist_dir(path: Path) -> Path:
    """A torch_dist checkpoint folder, or a NeMo 2 checkpoint whose weights/ holds one."""
    for candidate in (path, path / "weights"):
        if (candidate / ".metadata").is_file():
            return candidate
    raise CheckpointFormatError(
        f"{path} is not a megatron-core distributed checkpoint (torch_dist): no .metadata "
        f"file in it or in {path / 'weights'}. Import a Hugging Face or GGUF model first "
        "with `python -m nemo_upcycle.import_dense`, or point model.dense_checkpoint at a "
        "NeMo 2 / Megatron checkpoint folder."
    )


class TorchDistCheckpoint:
    """A megatron-core ``torch_dist`` checkpoint (also NeMo 2's ``weights/`` folder).

    Reads go straight to PyTorch's distributed-checkpoint storage layer on this rank
    alone: no process group, no collective, no planning exchange. Each stored chunk is
    read at most once per :meth:`read` call and released before the next, so peak memory
    is the destination tensors plus one chunk.
    """

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = _torch_dist_dir(Path(path))
        self._reader = FileSystemReader(str(self.path))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as err:  # unreadable / truncated metadata
            raise CheckpointFormatError(
                f"cannot read the checkpoint metadata in {self.path}: {err}"
            ) from err
        self._storage = self.metadata.storage_data

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {
            key: tuple(md.size)
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def storage_files(self) -> dict[str, int]:
        """Expected minimum size of every data file, from the metadata (integrity checks)."""
        sizes: dict[str, int] = {}
        for info in self._storage.values():
            end = info.offset + info.length
            sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
        return sizes

    def read(self, requests: list[SliceRequest]) -> ReadStats:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        stats = ReadStats()
        by_chunk: dict = {}
        for req in requests:
            md = self.metadata.state_dict_metadata[req.key]
            local = ChunkStorageMetadata(offsets=torch.Size(req.offsets), sizes=req.target.shape)
            for item in create_read_items_for_chunk_list(req.key, md, [local]):
                by_chunk.setdefault(item.storage_index, []).append((item, req.target))
            stats.elements_delivered += req.numel
            stats.keys.add(req.key)

        # Sorted by file and offset: one sequential pass over each file.
        order = sorted(by_chunk, key=lambda idx: (self._storage[idx].relative_path, self._storage[idx].offset))
        handles: dict[str, io.BufferedReader] = {}
        try:
            for index in order:
                info = self._storage[index]
                handle = handles.get(info.relative_path)
                if handle is None:
                    handle = handles[info.relative_path] = open(self.path / info.relative_path, "rb")
                handle.seek(info.offset)
                blob = handle.read(info.length)
                if len(blob) != info.length:
                    raise CheckpointFormatError(
                        f"{self.path / info.relative_path} is truncated: tensor {index.fqn} needs "
                        f"bytes {info.offset}..{info.offset + info.length}"
                    )
                chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                del blob
                stats.bytes_read += info.length
                stats.chunks_read += 1
                with torch.no_grad():
                    for item, target in by_chunk[index]:
                        src = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
                        dst = narrow_tensor_by_index(target, item.dest_offsets, item.lengths)
                        dst.copy_(src)
                del chunk
        finally:
            for handle in handles.values():
                handle.close()
        return stats
