"""Bytes each rank reads from the dense checkpoint during online upcycling.

Mirrors :func:`nemo_upcycle.upcycle.plan.build_plan`: a rank reads its shard of every non-FFN
tensor (embedding and output-layer rows of its tensor-parallel slice, attention slices, the
replicated norms), the FFN slice of each layer left dense, and for each upcycled layer ONE copy
of the dense FFN slice per distinct expert slice it holds; its other local experts are copied
in memory. Routers and shared-expert gates are initialised, not read. With granularity G,
local experts ``ep_rank*n .. ep_rank*n + n - 1`` (n = spec.num_experts/ep) use slices
``spec.ffn_slice_of(expert)``, which cycle through spec.routed_slices of them (G, or G - S
beside S shared slices): min(n, routed_slices) distinct slices of width F/G, each split over
the etp expert-tensor-parallel ranks. A shared expert adds its tensor-parallel shard of its
block of the dense FFN (the whole FFN, or its first S slices) on every rank.
"""
from __future__ import annotations

from typing import Any

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.planner.layout import Layout, moe_layer_flags, moe_spec
from nemo_upcycle.planner.params import (
    attention_params,
    dense_ffn_params,
    edge_params,
    expert_params,
    norm_params,
    shared_ffn_params,
    stage_chunks,
)

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


def elements_read(cfg: Any, layout: Layout, pp_rank: int) -> int:
    """Elements of the dense checkpoint read by one rank of pipeline stage ``pp_rank``."""
    arch, spec = Architecture.of(cfg.model), moe_spec(cfg)
    flags = moe_layer_flags(cfg)
    tp = layout.tp
    total = 0
    for layers, first_chunk, last_chunk in stage_chunks(cfg, pp_rank):
        total += edge_params(arch, tp, first_chunk, last_chunk)
        for layer in layers:
            total += attention_params(arch, tp) + 2 * norm_params(arch)
            if flags[layer]:
                local = spec.num_experts // layout.ep
                total += min(local, spec.routed_slices) * expert_params(spec, layout.etp)
                total += shared_ffn_params(spec, tp)
            else:
                total += dense_ffn_params(arch, tp)
    return total


def checkpoint_bytes_per_element(plan: Any) -> int:
    return DTYPE_BYTES[str(plan.checkpoint_dtype).lower()]
