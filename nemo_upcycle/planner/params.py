"""Exact parameter counts of the dense and the upcycled model, in total and per rank.

The counts follow megatron-core's GPTModel for a Llama layer (RMSNorm, no biases, GQA,
SwiGLU) tensor by tensor, so that they can be compared for equality with real models
(tests/test_planning.py): a planner that is off by one tensor would also be off in every
memory figure derived from it.

Per layer (H hidden, F FFN width, n heads, g query groups, d = H/n head dim):
  attention   qkv (n + 2g)*d*H, proj H*n*d, input norm H
  FFN         pre-MLP norm H, then dense fc1 2F*H + fc2 H*F = 3HF, or MoE: router (E*G)*H
              and E*G experts of 3*H*(F/G) each (granularity G; E*G*3H*F/G = E*3HF)
  shared      moe.shared_expert: a SwiGLU of width W = spec.shared_ffn_hidden_size (3*H*W, split
              over TP like a dense FFN), plus a (1, H) gate weight when gated (replicated);
              the routed experts are then spec.num_experts = E*(G-S) in slices mode
Model: embedding V*H, final norm H, output layer V*H unless embeddings are tied.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.planner.layout import moe_layer_flags, moe_spec, stage_layers
from nemo_upcycle.upcycle.spec import UpcycleSpec


def attention_params(arch: Architecture, tp: int = 1) -> int:
    """qkv + output projection of one layer, on one of ``tp`` tensor-parallel ranks."""
    d = arch.head_dim
    rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    qkv = rows * (arch.hidden_size + (1 if arch.qkv_bias else 0))
    proj = arch.hidden_size * arch.num_attention_heads * d
    # Qwen3's q/k norms (one head_dim weight each) are replicated, not split, across tp.
    qk_norms = 2 * d * tp if arch.qk_layernorm else 0
    return (qkv + proj + qk_norms) // tp


def norm_params(arch: Architecture) -> int:
    """One RMSNorm weight; replicated (not split) across tensor-parallel ranks."""
    return arch.hidden_size


def dense_ffn_params(arch: Architecture, tp: int = 1) -> int:
    """SwiGLU fc1 (gate and up, 2F x H) plus fc2 (H x F)."""
    return 3 * arch.hidden_size * arch.ffn_hidden_size // tp


def expert_params(spec: UpcycleSpec, etp: int = 1) -> int:
    """One (fine-grained) expert of width F/G, on one of ``etp`` expert-tensor-parallel ranks."""
    return 3 * spec.hidden_size * spec.expert_ffn_hidden_size // etp


def shared_ffn_params(spec: UpcycleSpec, tp: int = 1) -> int:
    """The shared expert's SwiGLU of width W (0 without one), on one of ``tp`` tensor-parallel
    ranks: megatron-core splits it like a dense FFN, and every expert-parallel rank holds it."""
    return 3 * spec.hidden_size * spec.shared_ffn_hidden_size // tp


def shared_gate_params(spec: UpcycleSpec) -> int:
    """The shared expert's (1, H) gate weight, full on every rank (0 ungated)."""
    return spec.hidden_size if spec.shared_gate else 0


def shared_expert_params(spec: UpcycleSpec, tp: int = 1) -> int:
    """Everything the shared expert holds on one of ``tp`` ranks: its SwiGLU shard and its gate."""
    return shared_ffn_params(spec, tp) + shared_gate_params(spec)


def router_params(spec: UpcycleSpec) -> int:
    """The router's (E*G) x H weight, full on every rank (it is data parallel, not sharded)."""
    return spec.num_experts * spec.hidden_size


def embedding_params(arch: Architecture, tp: int = 1) -> int:
    return arch.vocab_size * arch.hidden_size // tp


@dataclass
class ModelParams:
    """Unique parameters of the whole model (tied embeddings counted once)."""

    total: int
    active: int  # used for one token: dense parts (shared experts too) + top-k experts per MoE layer
    embedding: int
    output_layer: int
    attention: int  # all layers, including the two norms of each layer
    dense_ffn: int  # FFNs of layers that stay dense
    experts: int  # all routed experts of all MoE layers
    shared_experts: int  # the shared experts of all MoE layers (gates included); 0 without
    routers: int
    final_norm: int
    moe_layers: int
    dense_layers: int
    dense_model_total: int  # the dense checkpoint's parameters
    dense_model_active: int

    def as_dict(self) -> dict:
        # Without a shared expert the key is left out: such plans read as they did before it existed.
        return {k: v for k, v in asdict(self).items() if k != "shared_experts" or v}


def model_params(cfg: Any) -> ModelParams:
    arch, spec = Architecture.of(cfg.model), moe_spec(cfg)
    flags = moe_layer_flags(cfg)
    n_moe = sum(flags)
    n_dense = len(flags) - n_moe
    L = arch.num_layers
    embedding = embedding_params(arch)
    output = 0 if arch.tie_embeddings else embedding
    attention = L * (attention_params(arch) + 2 * norm_params(arch))
    dense_ffn = n_dense * dense_ffn_params(arch)
    final_norm = norm_params(arch)
    if spec is not None:
        experts = n_moe * spec.num_experts * expert_params(spec)
        shared_experts = n_moe * shared_expert_params(spec)
        routers = n_moe * router_params(spec)
        # top-k is T*G fine experts of width F/G, the weights of T dense FFNs (T*(G-S) of them
        # beside S shared slices); the shared expert runs for every token.
        active_experts = n_moe * spec.topk * expert_params(spec)
    else:
        experts = shared_experts = routers = active_experts = 0
    always = embedding + output + attention + dense_ffn + final_norm + shared_experts
    dense_total = embedding + output + attention + final_norm + L * dense_ffn_params(arch)
    return ModelParams(
        total=always + experts + routers,
        active=always + routers + active_experts,
        embedding=embedding,
        output_layer=output,
        attention=attention,
        dense_ffn=dense_ffn,
        experts=experts,
        shared_experts=shared_experts,
        routers=routers,
        final_norm=final_norm,
        moe_layers=n_moe,
        dense_layers=n_dense,
        dense_model_total=dense_total,
        dense_model_active=dense_total,
    )


@dataclass
class RankParams:
    """Parameters held by one rank of pipeline stage ``pp_rank`` (all its model chunks).

    ``expert`` are the routed experts' weights (replicated over the expert data-parallel group);
    ``dense`` everything else (replicated over the data-parallel group), routers and shared
    experts included: megatron-core treats a shared expert like a dense FFN.
    """

    pp_rank: int
    layers: list[int]
    moe_layers: int
    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total)


def rank_params(cfg: Any, pp_rank: int, tp: int, ep: int, etp: int) -> RankParams:
    """What megatron-core allocates on one rank of pipeline stage ``pp_rank``.

    Shapes are equal on all tensor/expert ranks of a stage (the layout is validated to
    divide evenly), so the pipeline rank is the only thing that varies.
    """
    arch, spec = Architecture.of(cfg.model), moe_spec(cfg)
    flags = moe_layer_flags(cfg)
    dense = expert = n_moe = 0
    for layers, first_chunk, last_chunk in stage_chunks(cfg, pp_rank):
        dense += edge_params(arch, tp, first_chunk, last_chunk)
        for layer in layers:
            dense += attention_params(arch, tp) + 2 * norm_params(arch)
            if flags[layer]:
                n_moe += 1
                dense += router_params(spec) + shared_expert_params(spec, tp)
                expert += spec.num_experts // ep * expert_params(spec, etp)
            else:
                dense += dense_ffn_params(arch, tp)
    return RankParams(
        pp_rank=pp_rank,
        layers=[i for layers in stage_layers(cfg, pp_rank) for i in layers],
        moe_layers=n_moe,
        dense=dense,
        expert=expert,
    )


def stage_chunks(cfg: Any, pp_rank: int):
    """(layer indices, holds the embedding, holds the output layer) of each virtual chunk of
    pipeline stage ``pp_rank``: the walk both the parameter count and the read count follow."""
    chunks = stage_layers(cfg, pp_rank)
    for v, layers in enumerate(chunks):
        yield layers, pp_rank == 0 and v == 0, pp_rank == cfg.parallel.pp - 1 and v == len(chunks) - 1


def edge_params(arch: Architecture, tp: int, first_chunk: bool, last_chunk: bool) -> int:
    """Embedding on the first chunk; final norm and output layer on the last."""
    total = embedding_params(arch, tp) if first_chunk else 0
    if last_chunk:
        total += norm_params(arch)
        # Tied embeddings: megatron allocates the output weight on the last stage unless that
        # stage also holds the embedding (one stage), and keeps the two in sync; the upcycler
        # then reads it from the embedding.
        if not arch.tie_embeddings or not first_chunk:
            total += embedding_params(arch, tp)
    return total


def all_rank_params(cfg: Any, layout) -> list[RankParams]:
    """One entry per pipeline stage (every rank of a stage holds the same counts)."""
    return [rank_params(cfg, p, layout.tp, layout.ep, layout.etp) for p in range(layout.pp)]
