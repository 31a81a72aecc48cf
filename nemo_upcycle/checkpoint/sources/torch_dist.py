"""The megatron-core / NeMo 2 distributed checkpoint (``torch_dist``) read slice by slice.

:class:`TorchDistCheckpoint` resolves each :class:`~nemo_upcycle.checkpoint.sources.slices.SliceRequest`
against the checkpoint's stored chunks with PyTorch's distributed-checkpoint metadata and
copies the overlaps straight into the requested tensors (:mod:`nemo_upcycle.checkpoint.sources.stored_tensor`
finds a chunk's bytes in its ``.distcp`` file). :data:`MODEL_INFO` is the import record
``import_dense`` writes beside the weights: what the checkpoint states about its architecture.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.checkpoint.sources.slices import ReadStats, SliceRequest, narrow_tensor_by_index
from nemo_upcycle.errors import UserError
from nemo_upcycle.platform.device import file_bytes_into, host_buffer, read_exactly

# The import record: this project's importer writes it into every torch_dist checkpoint it makes.
MODEL_INFO = "nemo_upcycle_model.json"


class CheckpointFormatError(UserError):
    pass


def _contiguous_span(sizes: tuple, offsets: tuple, lengths: tuple) -> Optional[tuple[int, int]]:
    """(first element, element count) of a box in a row-major array, if the box is one span.

    It is when every axis after some axis k is taken whole and every axis before k has
    length 1 (e.g. a block of rows of a matrix); a block of columns is not.
    """
    k = next((j for j in reversed(range(len(sizes))) if lengths[j] != sizes[j]), None)
    if k is None:
        return 0, _numel(sizes)
    if any(lengths[j] != 1 for j in range(k)):
        return None
    first, stride = 0, 1
    for j in reversed(range(len(sizes))):
        first += offsets[j] * stride
        stride *= sizes[j]
    return first, _numel(lengths)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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


def check_shard_sizes(folder: Path, expected: dict[str, int]) -> None:
    """Every data file the metadata names exists and is at least as long as its chunks need.

    ``expected`` maps file name -> the largest ``offset + length`` of any chunk stored in it.
    Reports every short or missing file at once, with expected and actual bytes.
    """
    problems = []
    for name, need in sorted(expected.items()):
        file = folder / name
        if not file.is_file():
            problems.append(f"{file} is missing (the metadata stores {need:,} bytes of tensors in it)")
            continue
        have = file.stat().st_size
        if have < need:
            problems.append(
                f"{file} is truncated: the checkpoint metadata says it holds {need:,} bytes, "
                f"the file has {have:,} ({need - have:,} missing)"
            )
    if problems:
        raise CheckpointFormatError(
            f"the checkpoint {folder} is incomplete (an interrupted copy or download?):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\ncopy it again from its source, or re-import it with `python -m nemo_upcycle.import_dense`"
        )


class TorchDistCheckpoint:
    """A megatron-core ``torch_dist`` checkpoint (also NeMo 2's ``weights/`` folder).

    Reads go straight to PyTorch's distributed-checkpoint storage layer on this rank
    alone: no process group, no collective, no planning exchange. Each stored chunk is
    read at most once per :meth:`read` call, straight into its destination when one
    request takes all of it, otherwise through one chunk-sized buffer released before the
    next, so peak memory is the destination tensors plus at most one chunk.
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
        # Cheap (one stat per file) and before any weight is read: a shard cut short by an
        # interrupted copy would otherwise surface mid-read, or as garbage weights.
        check_shard_sizes(self.path, self.storage_files())

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
                with torch.no_grad():
                    read = self._read_in_place(index, info, handle, by_chunk[index])
                    if read is None:
                        self._read_with_torch_load(index, info, handle, by_chunk[index])
                        read = info.length
                stats.bytes_read += read
                stats.chunks_read += 1
        finally:
            for handle in handles.values():
                handle.close()
        return stats

    def _chunk_shape(self, index) -> tuple[torch.Size, torch.dtype]:
        """Shape and dtype of the stored chunk ``index`` (from the metadata: no read)."""
        md = self.metadata.state_dict_metadata[index.fqn]
        offsets = torch.Size(index.offset)
        hint = index.index
        if hint is not None and hint < len(md.chunks) and md.chunks[hint].offsets == offsets:
            return md.chunks[hint].sizes, md.properties.dtype
        for chunk in md.chunks:
            if chunk.offsets == offsets:
                return chunk.sizes, md.properties.dtype
        raise CheckpointFormatError(f"{self.path}: no stored chunk of {index.fqn} at offsets {list(offsets)}")

    def _read_in_place(self, index, info, handle, items) -> Optional[int]:
        """Read the chunk's raw values without ``torch.load`` (see stored_tensor); bytes read, or None.

        A request whose part of the chunk is one contiguous byte range (a whole layer's
        tensor, or a block of rows: tensor-parallel slices of column-parallel weights) and
        whose destination is contiguous is read straight from the file into the parameter:
        no temporary memory, and only those bytes. Any other request (columns of a
        row-parallel weight) is served from one chunk-sized buffer, read once.
        """
        from nemo_upcycle.checkpoint.sources.stored_tensor import locate_payload

        sizes, dtype = self._chunk_shape(index)
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = sizes.numel() * itemsize
        payload = locate_payload(handle, info.offset, info.length, expected)
        if payload is None:
            return None
        buffer = None
        read = 0
        for item, target in items:
            dst = narrow_tensor_by_index(target, item.dest_offsets, item.lengths)
            span = _contiguous_span(tuple(sizes), tuple(item.storage_offsets), tuple(item.lengths))
            if span is not None and dst.dtype == dtype and dst.is_contiguous():
                first, count = span
                self._read_into(handle, payload.offset + first * itemsize, dst, count * itemsize, index, info)
                read += count * itemsize
                continue
            if buffer is None:
                buffer = host_buffer(sizes, dtype)
                self._read_into(handle, payload.offset, buffer, expected, index, info)
                read += expected
            dst.copy_(narrow_tensor_by_index(buffer, item.storage_offsets, item.lengths))
        return read

    def _read_into(self, handle, offset: int, dst: torch.Tensor, nbytes: int, index, info) -> None:
        """``nbytes`` from ``offset`` of the file into contiguous ``dst``: straight into its
        memory on the host, through a (pinned) host buffer into a GPU parameter."""
        def short() -> CheckpointFormatError:
            return CheckpointFormatError(
                f"{self.path / info.relative_path} is truncated: tensor {index.fqn} needs "
                f"bytes {offset}..{offset + nbytes}"
            )

        handle.seek(offset)
        file_bytes_into(lambda view: read_exactly(handle, view[:nbytes], short), dst)

    def _read_with_torch_load(self, index, info, handle, items) -> None:
        handle.seek(info.offset)
        blob = handle.read(info.length)
        if len(blob) != info.length:
            raise CheckpointFormatError(
                f"{self.path / info.relative_path} is truncated: tensor {index.fqn} needs "
                f"bytes {info.offset}..{info.offset + info.length}"
            )
        chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        del blob
        for item, target in items:
            src = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
            narrow_tensor_by_index(target, item.dest_offsets, item.lengths).copy_(src)
