"""A model in memory seen as a megatron-keyed source, so that it is exported like a checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from nemo_upcycle.checkpoint.sources.slices import ReadStats, SliceRequest, narrow_tensor_by_index


class ModelSource:
    """This rank's model chunks as a megatron-keyed source (the export of a model in memory)."""

    def __init__(self, chunks: list):
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        self.path = Path("<model in memory>")
        self._chunks: dict[str, list[tuple[tuple, torch.Tensor]]] = {}
        self._shapes: dict[str, tuple] = {}

        def add(sh):
            if isinstance(sh, ShardedTensorFactory):
                for inner in nested_values(sh.build()):
                    add(inner)
                return
            if not isinstance(sh, ShardedTensor):
                return
            data = sh.data.detach()
            for _ in range(sh.prepend_axis_num):
                data = data.unsqueeze(0)
            self._chunks.setdefault(sh.key, []).append((tuple(sh.global_offset), data))
            self._shapes[sh.key] = tuple(sh.global_shape)

        for chunk in chunks:
            for sh in nested_values(chunk.sharded_state_dict()):
                add(sh)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self) -> torch.dtype:
        return next(iter(self._chunks.values()))[0][1].dtype

    def read(self, requests: list[SliceRequest]) -> ReadStats:
        stats = ReadStats()
        with torch.no_grad():
            for req in requests:
                want_lo, want_shape = req.offsets, req.target.shape
                for offsets, data in self._chunks[req.key]:
                    lo = [max(a, b) for a, b in zip(want_lo, offsets)]
                    hi = [min(a + n, b + m) for a, n, b, m in zip(want_lo, want_shape, offsets, data.shape)]
                    if any(h <= low for low, h in zip(lo, hi)):
                        continue
                    sizes = [h - low for low, h in zip(lo, hi)]
                    src = narrow_tensor_by_index(data, [low - o for low, o in zip(lo, offsets)], sizes)
                    dst = narrow_tensor_by_index(req.target, [low - o for low, o in zip(lo, want_lo)], sizes)
                    dst.copy_(src)
                    stats.bytes_read += src.numel() * src.element_size()
                    stats.chunks_read += 1
                stats.elements_delivered += req.numel
                stats.keys.add(req.key)
        return stats
