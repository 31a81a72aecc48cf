"""Mapping between Hugging Face Llama-family / MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4-MoE) tensors and megatron-core GPTModel tensors.

Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms) share one layout; the flags of
:class:`LlamaShape` add the family's extra tensors.

Both directions (import, online upcycling from safetensors, export) use one description:
a list of :class:`Box` rows. A box says "rows ``[hf_row, hf_row + rows)`` of HF tensor
``hf`` are rows ``[mg_row, mg_row + rows)`` of megatron tensor ``(layer, name, expert)``",
always over all columns. The fused layouts of megatron-core are boxes too:

* ``linear_qkv``: per query group ``g``, that group's query heads, then its key head, then
  its value head (``[q_g0, k_0, v_0, q_g1, k_1, v_1, ...]``);
* ``linear_fc1`` of a SwiGLU MLP (dense, expert or shared expert): ``[gate; up]``.

A megatron tensor is an HF tensor's rows as they are, except an ungated shared expert's down
projection on Qwen2-MoE, which is stored times 2 (:func:`hf_factors`, hf/moe_layouts.py).

Megatron tensors are named canonically as (layer or None, name within the layer, expert
or None); :mod:`nemo_upcycle.model.megatron_keys` (the one home of megatron-core's key
naming: both layer specs, stacked or per-layer keys, NeMo 2's ``module.`` prefix) turns
checkpoint keys into that form and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.checkpoint.hf.export_targets import moe_layout as moe_layout_of
from nemo_upcycle.checkpoint.hf.moe_layouts import FIXED_GATE_FACTOR, GATED, INERT, UNGATED, shared_expert_kind
from nemo_upcycle.model.megatron_keys import (
    ATTN_NORM,
    Canonical,
    EMBEDDING,
    EXPERT_FC1,
    EXPERT_FC2,
    FC1,
    FC2,
    FINAL_NORM,
    K_NORM,
    MLP_NORM,
    OUTPUT,
    PROJ,
    Q_NORM,
    QKV,
    QKV_BIAS,
    ROUTER,
    ROUTER_BIAS,
    SHARED_FC1,
    SHARED_FC2,
    SHARED_GATE,
)
from nemo_upcycle.upcycle.spec import UpcycleSpec


@dataclass(frozen=True)
class LlamaShape:
    """What the mapping needs to know about a (dense or MoE) Llama-architecture model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int  # per expert for MoE layers, dense FFN width otherwise
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    num_experts: int = 0
    moe_layers: list = field(default_factory=list)  # layer indices with an MoE FFN
    dense_ffn_hidden_size: Optional[int] = None  # FFN width of layers left dense
    moe_layout: str = "mixtral"  # how the HF MoE layers are named (checkpoint/hf/moe_layouts.py)
    shared_expert_width: int = 1  # of the HF shared expert (Qwen2-MoE, GLM-4-MoE)
    # How it holds megatron-core's (hf/moe_layouts.py): INERT (none: zeros), GATED or UNGATED.
    shared_expert: str = INERT

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer in set(self.moe_layers)

    @classmethod
    def of(cls, arch: Architecture, spec: Optional[UpcycleSpec] = None,
           moe_layout: Optional[str] = None) -> "LlamaShape":
        """The HF shape of ``arch`` upcycled by ``spec`` (None, or a dense spec: the dense model),
        its MoE layers named as ``moe_layout`` (an MoE model_type, hf/moe_layouts.py).

        Granular experts become E·G experts of width F/G (E·(G - S) beside S shared slices),
        the shared expert the layout's.
        """
        dense = cls(
            num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
            num_query_groups=arch.num_query_groups, head_dim=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
            vocab_size=arch.vocab_size, tie_embeddings=arch.tie_embeddings, qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_layernorm,
        )
        if spec is None or not spec.is_moe:
            return dense
        if moe_layout is None:
            raise ValueError("an MoE model's HF shape needs the layout of its MoE layers")
        kind, width = shared_expert_kind(spec), moe_layout_of(moe_layout).hf_shared_width(spec)
        return replace(dense, ffn_hidden_size=spec.expert_ffn_hidden_size, dense_ffn_hidden_size=arch.ffn_hidden_size,
                       num_experts=spec.num_experts, moe_layers=list(spec.moe_layers), moe_layout=moe_layout,
                       shared_expert=kind, shared_expert_width=width)

    @classmethod
    def of_model(cls, model: Any, **moe: Any) -> "LlamaShape":
        """The shape of the model a ``model.*`` config (or a dict of its keys) describes, with
        ``moe`` replacing fields: an MoE folder read back states its experts itself (hf/read_back.py)."""
        return replace(cls.of(Architecture.of(model)), **moe)


@dataclass(frozen=True)
class Box:
    hf: str
    hf_row: int
    rows: int
    target: Canonical
    mg_row: int


def _rows_box(hf: str, target: Canonical, rows: int) -> Box:
    return Box(hf, 0, rows, target, 0)


def qkv_boxes(prefix: str, layer: int, heads: int, groups: int, head_dim: int, param: str = "weight") -> list[Box]:
    """The fused QKV weight (or, with ``param="bias"``, its bias: the same rows)."""
    per_group = heads // groups
    stride = (per_group + 2) * head_dim
    target = (layer, QKV if param == "weight" else QKV_BIAS, None)
    boxes = []
    for g in range(groups):
        base = g * stride
        boxes.append(Box(f"{prefix}self_attn.q_proj.{param}", g * per_group * head_dim, per_group * head_dim, target, base))
        boxes.append(Box(f"{prefix}self_attn.k_proj.{param}", g * head_dim, head_dim, target, base + per_group * head_dim))
        boxes.append(Box(f"{prefix}self_attn.v_proj.{param}", g * head_dim, head_dim, target, base + (per_group + 1) * head_dim))
    return boxes


def llama_boxes(shape: LlamaShape) -> list[Box]:
    """Every HF <-> megatron correspondence of a Llama (dense) or Mixtral (MoE) model."""
    h = shape.hidden_size
    boxes = [_rows_box("model.embed_tokens.weight", (None, EMBEDDING, None), shape.vocab_size)]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        boxes.append(_rows_box(p + "input_layernorm.weight", (i, ATTN_NORM, None), h))
        boxes += qkv_boxes(p, i, shape.num_attention_heads, shape.num_query_groups, shape.head_dim)
        if shape.qkv_bias:
            boxes += qkv_boxes(p, i, shape.num_attention_heads, shape.num_query_groups, shape.head_dim, "bias")
        if shape.qk_layernorm:
            boxes.append(_rows_box(p + "self_attn.q_norm.weight", (i, Q_NORM, None), shape.head_dim))
            boxes.append(_rows_box(p + "self_attn.k_norm.weight", (i, K_NORM, None), shape.head_dim))
        boxes.append(_rows_box(p + "self_attn.o_proj.weight", (i, PROJ, None), h))
        boxes.append(_rows_box(p + "post_attention_layernorm.weight", (i, MLP_NORM, None), h))
        if shape.is_moe_layer(i):
            f, lay = shape.ffn_hidden_size, moe_layout_of(shape.moe_layout)
            if not lay.holds(shape.shared_expert):  # export_targets refuses this before any mapping
                raise ValueError(f"{lay.model_type} holds no {shape.shared_expert} shared expert")
            boxes.append(_rows_box(lay.router(p), (i, ROUTER, None), shape.num_experts))
            if lay.router_bias:
                boxes.append(_rows_box(lay.router_bias_name(p), (i, ROUTER_BIAS, None), shape.num_experts))
            for e in range(shape.num_experts):
                boxes.append(Box(lay.expert(p, e, lay.gate), 0, f, (i, EXPERT_FC1, e), 0))
                boxes.append(Box(lay.expert(p, e, lay.up), 0, f, (i, EXPERT_FC1, e), f))
                boxes.append(_rows_box(lay.expert(p, e, lay.down), (i, EXPERT_FC2, e), h))
            if shape.shared_expert != INERT:
                w = shape.shared_expert_width
                boxes.append(Box(lay.shared_proj(p, lay.gate), 0, w, (i, SHARED_FC1, None), 0))
                boxes.append(Box(lay.shared_proj(p, lay.up), 0, w, (i, SHARED_FC1, None), w))
                boxes.append(_rows_box(lay.shared_proj(p, lay.down), (i, SHARED_FC2, None), h))
            if shape.shared_expert == GATED:
                boxes.append(_rows_box(lay.shared_gate_name(p), (i, SHARED_GATE, None), 1))
        else:
            f = shape.dense_ffn_hidden_size or shape.ffn_hidden_size
            boxes.append(Box(p + "mlp.gate_proj.weight", 0, f, (i, FC1, None), 0))
            boxes.append(Box(p + "mlp.up_proj.weight", 0, f, (i, FC1, None), f))
            boxes.append(_rows_box(p + "mlp.down_proj.weight", (i, FC2, None), h))
    boxes.append(_rows_box("model.norm.weight", (None, FINAL_NORM, None), h))
    if not shape.tie_embeddings:
        boxes.append(_rows_box("lm_head.weight", (None, OUTPUT, None), shape.vocab_size))
    return boxes


def hf_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Shapes of every HF tensor of the model (the HF side of :func:`llama_boxes`)."""
    h, d = shape.hidden_size, shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (shape.num_attention_heads * d, h)
        out[p + "self_attn.k_proj.weight"] = (shape.num_query_groups * d, h)
        out[p + "self_attn.v_proj.weight"] = (shape.num_query_groups * d, h)
        if shape.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (shape.num_attention_heads * d,)
            out[p + "self_attn.k_proj.bias"] = (shape.num_query_groups * d,)
            out[p + "self_attn.v_proj.bias"] = (shape.num_query_groups * d,)
        if shape.qk_layernorm:
            out[p + "self_attn.q_norm.weight"] = (d,)
            out[p + "self_attn.k_norm.weight"] = (d,)
        out[p + "self_attn.o_proj.weight"] = (h, shape.num_attention_heads * d)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if shape.is_moe_layer(i):
            f, lay = shape.ffn_hidden_size, moe_layout_of(shape.moe_layout)
            out[lay.router(p)] = (shape.num_experts, h)
            if lay.router_bias:
                out[lay.router_bias_name(p)] = (shape.num_experts,)
            for e in range(shape.num_experts):
                out[lay.expert(p, e, lay.gate)] = (f, h)
                out[lay.expert(p, e, lay.down)] = (h, f)
                out[lay.expert(p, e, lay.up)] = (f, h)
            out.update(lay.shared_shapes(p, h, shape.shared_expert_width))
        else:
            f = shape.dense_ffn_hidden_size or shape.ffn_hidden_size
            out[p + "mlp.gate_proj.weight"] = (f, h)
            out[p + "mlp.up_proj.weight"] = (f, h)
            out[p + "mlp.down_proj.weight"] = (h, f)
    out["model.norm.weight"] = (h,)
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def inert_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """The HF tensors no megatron tensor maps to, written as zeros: the architecture's shared
    expert where the model has none, Qwen2-MoE's gate of an ungated one (hf/moe_layouts.py)."""
    mapped = {b.hf for b in llama_boxes(shape)}
    return {name: s for name, s in hf_shapes(shape).items() if name not in mapped}


def zero_tensors(shape: LlamaShape) -> list[str]:
    """Of :func:`inert_shapes`, those whose zeros the folder needs to compute the megatron model
    (the others need only be finite: 0 times them is 0)."""
    lay = moe_layout_of(shape.moe_layout)
    return [name for i in shape.moe_layers if shape.is_moe_layer(i)
            for name in lay.zero_tensors(f"model.layers.{i}.", shape.shared_expert)]


def hf_factors(shape: LlamaShape) -> dict[Canonical, float]:
    """Megatron tensors the HF folder stores times a factor (export multiplies, import divides):
    an ungated shared expert's down projection behind Qwen2-MoE's gate fixed at sigmoid(0) = 1/2.
    Powers of two, so both directions are exact."""
    if shape.shared_expert != UNGATED or moe_layout_of(shape.moe_layout).shared_gate is None:
        return {}
    return {(i, SHARED_FC2, None): FIXED_GATE_FACTOR for i in shape.moe_layers if shape.is_moe_layer(i)}


def canonical_shapes(boxes: list[Box], hf: dict[str, tuple[int, ...]]) -> dict[Canonical, tuple[int, ...]]:
    """Shape of every canonical megatron tensor, from the boxes and the HF shapes."""
    out: dict[Canonical, tuple[int, ...]] = {}
    for b in boxes:
        rest = tuple(hf[b.hf][1:])
        rows = b.mg_row + b.rows
        have = out.get(b.target)
        out[b.target] = (max(rows, have[0]) if have else rows,) + rest
    return out
