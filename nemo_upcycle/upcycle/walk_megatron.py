"""Describe megatron-core GPTModel chunks as :mod:`~nemo_upcycle.upcycle.local_model` data.

The only part of the planning that touches megatron-core objects: it lists each chunk's
sharded state dict (keys, global shapes, offsets, the parameter behind each) and the FFN
of each decoder layer (dense, or router plus local experts), and decides nothing.
"""
from __future__ import annotations

import torch

from nemo_upcycle.upcycle.local_model import (
    ChunkDescription,
    DenseFfn,
    Ffn,
    LocalExpert,
    MoeFfn,
    Param,
    SharedExpert,
    StateTensor,
)


def describe_chunks(chunks: list) -> list[ChunkDescription]:
    return [describe_chunk(chunk) for chunk in chunks]


def describe_chunk(chunk: torch.nn.Module) -> ChunkDescription:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    parameter_of = {p.data_ptr(): n for n, p in chunk.named_parameters()}
    state, factory_keys = [], []
    for sh in nested_values(chunk.sharded_state_dict()):
        if isinstance(sh, ShardedTensorFactory):
            factory_keys.append(sh.key)
        elif isinstance(sh, ShardedTensor):
            state.append(StateTensor(
                key=sh.key,
                global_shape=tuple(sh.global_shape),
                global_offset=tuple(sh.global_offset),
                local_shape=tuple(sh.local_shape),
                prepend_axis_num=sh.prepend_axis_num,
                parameter=None if sh.data is None else parameter_of.get(sh.data.data_ptr()),
            ))
        # ShardedObjects (TE/FP8 extra state) are rebuilt at step 0: nothing to plan.
    # One walk of the module tree per chunk (a walk per layer is quadratic in depth).
    module_names = {id(m): n for n, m in chunk.named_modules()}
    ffns = tuple(_describe_ffn(layer, module_names) for layer in chunk.decoder.layers)
    return ChunkDescription(tuple(state), tuple(factory_keys), ffns)


def _describe_ffn(layer_module, module_names: dict[int, str]) -> Ffn:
    layer = layer_module.layer_number - 1
    mlp = layer_module.mlp
    prefix = _module_name(module_names, mlp)
    if not hasattr(mlp, "router"):
        return DenseFfn(
            layer,
            Param(f"{prefix}.linear_fc1.weight", tuple(mlp.linear_fc1.weight.shape)),
            Param(f"{prefix}.linear_fc2.weight", tuple(mlp.linear_fc2.weight.shape)),
        )
    experts = tuple(
        LocalExpert(
            expert=mlp.local_expert_indices[local_idx],
            fc1=Param(f"{prefix}.experts.{n1}", tuple(w1.shape)),
            fc2=Param(f"{prefix}.experts.{n2}", tuple(w2.shape)),
        )
        for local_idx, (n1, w1, n2, w2) in enumerate(local_expert_weights(mlp.experts))
    )
    shared = None
    if getattr(mlp, "shared_experts", None) is not None:
        se = mlp.shared_experts
        gate = None if se.gate_weight is None else Param(f"{prefix}.shared_experts.gate_weight", tuple(se.gate_weight.shape))
        shared = SharedExpert(Param(f"{prefix}.shared_experts.linear_fc1.weight", tuple(se.linear_fc1.weight.shape)),
                              Param(f"{prefix}.shared_experts.linear_fc2.weight", tuple(se.linear_fc2.weight.shape)),
                              gate)
    return MoeFfn(layer, Param(f"{prefix}.router.weight", tuple(mlp.router.weight.shape)), experts, shared)


def local_expert_weights(experts) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """(fc1 name, fc1 [2F_local, H], fc2 name, fc2 [H, F_local]) per local expert.

    Supports megatron-core's SequentialMLP (local spec) and TEGroupedMLP (TE + grouped GEMM).
    """
    if hasattr(experts, "local_experts"):
        return [
            (
                f"local_experts.{i}.linear_fc1.weight",
                mlp.linear_fc1.weight,
                f"local_experts.{i}.linear_fc2.weight",
                mlp.linear_fc2.weight,
            )
            for i, mlp in enumerate(experts.local_experts)
        ]
    if hasattr(experts.linear_fc1, "weight0"):
        return [
            (
                f"linear_fc1.weight{i}",
                getattr(experts.linear_fc1, f"weight{i}"),
                f"linear_fc2.weight{i}",
                getattr(experts.linear_fc2, f"weight{i}"),
            )
            for i in range(experts.num_local_experts)
        ]
    raise NotImplementedError(
        f"unsupported experts module {type(experts).__name__}: use SequentialMLP (local spec) "
        "or TEGroupedMLP (moe_grouped_gemm with Transformer Engine)"
    )


def _module_name(names: dict[int, str], module: torch.nn.Module) -> str:
    if id(module) in names:
        return names[id(module)]
    raise KeyError(f"{type(module).__name__} is not part of the model chunk")
