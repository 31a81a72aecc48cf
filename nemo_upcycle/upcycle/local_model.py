"""This rank's model as plain data: what the upcycle planner needs to know, and nothing else.

:mod:`nemo_upcycle.upcycle.walk_megatron` fills these from megatron-core model chunks and
its ``parallel_state``; :func:`nemo_upcycle.upcycle.plan.plan_upcycle` turns them into the
plan. Keeping megatron out of the middle makes the plan computable (and testable) from a
description written by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class RankCoordinates:
    """Where this rank sits in the tensor-parallel groups that shard the weights it reads."""

    tp_rank: int = 0
    tp_size: int = 1
    etp_rank: int = 0  # expert-tensor-parallel: how expert FFNs are split
    etp_size: int = 1

    @classmethod
    def current(cls) -> "RankCoordinates":
        """Read megatron-core's global parallel state (initialised by the caller)."""
        from megatron.core import parallel_state as ps

        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
        )


@dataclass(frozen=True)
class StateTensor:
    """One ``ShardedTensor`` of a chunk's ``sharded_state_dict()``."""

    key: str  # megatron's checkpoint key
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    local_shape: tuple[int, ...]
    prepend_axis_num: int = 0  # leading axes megatron adds (the layer axis of stacked keys)
    # The parameter (name within the chunk) that holds the data; None when none does
    # (tensors the planner takes from the modules instead, e.g. grouped expert weights).
    parameter: Optional[str] = None


@dataclass(frozen=True)
class Param:
    name: str  # within the chunk
    shape: tuple[int, ...]  # local (this rank's shard)


@dataclass(frozen=True)
class DenseFfn:
    """A layer that keeps its dense FFN (tensor-parallel like the dense model)."""

    layer: int  # global layer index (0-based)
    fc1: Param
    fc2: Param


@dataclass(frozen=True)
class LocalExpert:
    expert: int  # global index among the E·G fine-grained experts
    fc1: Param
    fc2: Param


@dataclass(frozen=True)
class SharedExpert:
    """The always-on shared expert of an MoE layer: tensor-parallel like a dense FFN."""

    fc1: Param
    fc2: Param
    gate: Optional[Param] = None  # (1, H) sigmoid gate weight, when gated


@dataclass(frozen=True)
class MoeFfn:
    """An upcycled layer: its router, the experts this rank holds (in local order), its shared expert."""

    layer: int
    router: Param
    experts: tuple[LocalExpert, ...]
    shared: Optional[SharedExpert] = None


Ffn = Union[DenseFfn, MoeFfn]


@dataclass(frozen=True)
class ChunkDescription:
    """One model chunk (a virtual pipeline stage) of this rank."""

    state: tuple[StateTensor, ...]  # in sharded_state_dict order
    factory_keys: tuple[str, ...]  # keys of ShardedTensorFactory entries (fused/split tensors)
    ffns: tuple[Ffn, ...]  # one per decoder layer of the chunk, in order
