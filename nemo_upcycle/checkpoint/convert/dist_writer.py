"""Write a megatron-core ``torch_dist`` checkpoint one tensor chunk at a time.

megatron-core's own ``dist_checkpointing.save`` stages every tensor of the state dict in
memory before writing (it is built for asynchronous saves during training), so a
conversion through it needs the whole model in memory. Here the *layout* of the
checkpoint (keys, global shapes, chunk offsets, ShardedObjects) comes from the model's
``sharded_state_dict()`` built on the ``meta`` device (no weight is allocated), and
PyTorch's distributed-checkpoint writer pulls each chunk's data from a callback while it
writes the file. Peak memory is about two chunks (one layer's tensor, or a 64 MiB row block
of the embedding and output layer), whatever the model's size.

The result is the same format megatron-core writes (``.metadata``, ``*.distcp``,
``metadata.json``, ``common.pt``): ``dist_checkpointing.load`` reads it at any layout.
It is written under ``<output>.tmp`` and renamed when complete.
"""
from __future__ import annotations

import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class TensorChunk:
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]  # including the leading axes (size 1)


@dataclass(frozen=True)
class ObjectItem:
    key: str  # megatron's unique key ("<key>/shard_<offsets>_<global shape>")
    data: Any


def template_from_model(chunks: list) -> tuple[list[TensorChunk], list[ObjectItem]]:
    """The checkpoint layout of ``chunks`` (main replicas of this rank; meta tensors are fine)."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, is_main_replica

    tensors: list[TensorChunk] = []
    objects: list[ObjectItem] = []

    def add(sh) -> None:
        if isinstance(sh, ShardedTensorFactory):
            for inner in nested_values(sh.build()):
                add(inner)
            return
        if not is_main_replica(sh.replica_id):
            return
        if isinstance(sh, ShardedTensor):
            if sh.flattened_range is not None:
                raise NotImplementedError(f"{sh.key}: flattened (distributed optimizer) tensors are not supported")
            lead = (1,) * sh.prepend_axis_num
            tensors.append(TensorChunk(sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                                       lead + tuple(sh.local_shape)))
        elif isinstance(sh, ShardedObject):
            objects.append(ObjectItem(sh.unique_key, sh.data))

    for chunk in chunks:
        for sh in nested_values(chunk.sharded_state_dict()):
            if isinstance(sh, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
                add(sh)
    return tensors, objects


def meta_model_template(overrides: list[str]) -> tuple[list[TensorChunk], list[ObjectItem]]:
    """Layout of the model ``compose_config(overrides)`` describes, at TP1/PP1/EP1, built on ``meta``.

    Initialises a one-rank gloo group (and megatron's parallel state) when none exists.
    """
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.util.ports import single_process_rendezvous

    single = ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=null", "parallel.ep=1",
              "parallel.etp=null", "parallel.cp=1", "parallel.sp=false"]
    cfg = compose_config(list(overrides) + single)
    single_process_rendezvous()
    setup_parallel(cfg.parallel, cfg.seed)
    with torch.device("meta"):
        chunks = build_model_chunks(cfg)
    return template_from_model(chunks)


def split_chunks(tensors: list[TensorChunk], max_bytes: int, itemsize: int) -> list[TensorChunk]:
    """Split chunks larger than ``max_bytes`` along their first non-leading axis.

    PyTorch's writer keeps the previous chunk alive while it produces the next, and sorts
    chunks by size, so the embedding and output layer would be in memory together; any
    chunking loads at any layout, so the big ones are written in row blocks instead.
    """
    out = []
    for t in tensors:
        nbytes = itemsize
        for s in t.shape:
            nbytes *= s
        axis = next((i for i, s in enumerate(t.shape) if s > 1), None)
        if nbytes <= max_bytes or axis is None:
            out.append(t)
            continue
        row_bytes = nbytes // t.shape[axis]
        rows = max(1, max_bytes // row_bytes)
        for start in range(0, t.shape[axis], rows):
            n = min(rows, t.shape[axis] - start)
            offsets = list(t.offsets)
            offsets[axis] += start
            shape = list(t.shape)
            shape[axis] = n
            out.append(TensorChunk(t.key, t.global_shape, tuple(offsets), tuple(shape)))
    return out


def _planner_class():
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class LazySavePlanner(DefaultSavePlanner):
        """Write items come from the template; data is produced only when the writer asks."""

        def __init__(self, tensors, objects, provide, dtype, on_tensor):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._tensors = {(t.key, tuple(t.offsets)): t for t in tensors}
            self._objects = {o.key: o for o in objects}
            self._provide, self._dtype, self._on_tensor = provide, dtype, on_tensor

        def create_local_plan(self) -> SavePlan:
            items = [
                WriteItem(
                    index=MetadataIndex(t.key, torch.Size(t.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(t.offsets), sizes=torch.Size(t.shape)),
                        properties=TensorProperties(dtype=self._dtype),
                        size=torch.Size(t.global_shape),
                    ),
                )
                for t in self._tensors.values()
            ]
            items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects]
            self.plan = SavePlan(items)
            return self.plan

        def create_global_plan(self, all_plans):
            from megatron.core.dist_checkpointing.strategies.torch import MCoreMetadata

            global_plan, metadata = super().create_global_plan(all_plans)
            mcore_data = {key: {} for key, _ in self._tensors}
            return global_plan, MCoreMetadata(mcore_data=mcore_data, **vars(metadata))

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save([self._objects[write_item.index.fqn].data], buf)
                return buf
            t = self._tensors[(write_item.index.fqn, tuple(write_item.index.offset))]
            data = self._provide(t.key, t.offsets, t.shape)
            if tuple(data.shape) != tuple(t.shape):
                raise ValueError(f"{t.key} at {list(t.offsets)}: got shape {list(data.shape)}, expected {list(t.shape)}")
            data = data.to(self._dtype).contiguous()
            self._on_tensor(t, data)
            return data

    return LazySavePlanner


def write_streaming(
    tensors: list[TensorChunk],
    objects: list[ObjectItem],
    provide: Callable[[str, tuple, tuple], torch.Tensor],
    output_dir: Path,
    dtype: torch.dtype = torch.float32,
    extra_files: Optional[dict[str, str]] = None,
    progress: bool = True,
    desc: str = "write",
    max_chunk_bytes: Optional[int] = 64 * 2**20,
) -> dict:
    """Write the checkpoint; ``provide(key, offsets, shape)`` returns one chunk's data.

    Chunks above ``max_chunk_bytes`` are written in row blocks (None: as the model shards them).
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from nemo_upcycle.util.progress import progress_bar

    started = time.perf_counter()
    if max_chunk_bytes:
        tensors = split_chunks(tensors, max_chunk_bytes, torch.empty((), dtype=dtype).element_size())
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = {"bytes": 0, "chunks": 0}
    bar = progress_bar(total=len(tensors), desc=desc, unit="tensor", disable=not progress)

    def on_tensor(t: TensorChunk, data: torch.Tensor) -> None:
        total["bytes"] += data.numel() * data.element_size()
        total["chunks"] += 1
        bar.update(1)

    try:
        planner = _planner_class()(tensors, objects, provide, dtype, on_tensor)
        writer = FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=False,
                                  thread_count=1, per_thread_copy_ahead=0)
        dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
        save_config(CheckpointingConfig("torch_dist"), str(tmp))
        torch.save({}, tmp / "common.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()
    tmp.rename(output_dir)
    return {
        "tensors": len({t.key for t in tensors}),
        "chunks": total["chunks"],
        "bytes": total["bytes"],
        "seconds": time.perf_counter() - started,
    }
