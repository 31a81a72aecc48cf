"""Mapping between Hugging Face Llama-family / MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) tensors and megatron-core GPTModel tensors.

Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms) share one layout; the flags of
:class:`LlamaShape` add the family's extra tensors.

Both directions (import, online upcycling from safetensors, export) use one description:
a list of :class:`Box` rows. A box says "rows ``[hf_row, hf_row + rows)`` of HF tensor
``hf`` are rows ``[mg_row, mg_row + rows)`` of megatron tensor ``(layer, name, expert)``",
always over all columns. The fused layouts of megatron-core are boxes too:

* ``linear_qkv``: per query group ``g``, that group's query heads, then its key head, then
  its value head (``[q_g0, k_0, v_0, q_g1, k_1, v_1, ...]``);
* ``linear_fc1`` of a SwiGLU MLP (dense or expert): ``[gate; up]``.

Megatron tensors are named canonically as (layer or None, name within the layer, expert
or None); :func:`parse_megatron_key` and :class:`MegatronNaming` turn checkpoint keys
(stacked ``decoder.layers.<name>`` with a leading layer axis, or per layer
``decoder.layers.<i>.<name>``, with or without NeMo 2's ``module.`` prefix) into that form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from nemo_upcycle.checkpoint.hf_moe_layouts import layout


# Canonical megatron names within a layer.
ATTN_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"  # Qwen2
Q_NORM = "self_attention.q_layernorm.weight"  # Qwen3: per-head RMSNorm, applied before RoPE
K_NORM = "self_attention.k_layernorm.weight"
PROJ = "self_attention.linear_proj.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
ROUTER = "mlp.router.weight"
ROUTER_BIAS = "mlp.router.expert_bias"  # router=aux_free: added to the scores for the choice only
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"
EXPERT_NAMES = (EXPERT_FC1, EXPERT_FC2)
# Outside the layers.
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"

Canonical = tuple  # (layer: Optional[int], name: str, expert: Optional[int])

_PER_LAYER = re.compile(r"^(module\.)?decoder\.layers\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^(module\.)?decoder\.layers\.(.+)$")


@dataclass
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
    moe_layout: str = "mixtral"  # how the HF MoE layers are named (checkpoint/hf_moe_layouts.py)
    shared_expert_width: int = 1  # of the inert shared expert (Qwen2-MoE, GLM-4-MoE)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer in set(self.moe_layers)

    @classmethod
    def of_model(cls, model, **moe) -> "LlamaShape":
        """The shape of the dense model a ``model.*`` config (or a dict of its keys) describes."""
        from nemo_upcycle.checkpoint.architecture import effective_head_dim

        get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
        return cls(
            num_layers=int(get("num_layers")), hidden_size=int(get("hidden_size")),
            num_attention_heads=int(get("num_attention_heads")), num_query_groups=int(get("num_query_groups")),
            head_dim=effective_head_dim(model), ffn_hidden_size=int(get("ffn_hidden_size")),
            vocab_size=int(get("vocab_size")), tie_embeddings=bool(get("tie_embeddings")),
            qkv_bias=bool(get("qkv_bias", False)), qk_layernorm=bool(get("qk_layernorm", False)), **moe,
        )


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
            f, lay = shape.ffn_hidden_size, layout(shape.moe_layout)
            boxes.append(_rows_box(lay.router(p), (i, ROUTER, None), shape.num_experts))
            if lay.router_bias:
                boxes.append(_rows_box(lay.router_bias_name(p), (i, ROUTER_BIAS, None), shape.num_experts))
            for e in range(shape.num_experts):
                boxes.append(Box(lay.expert(p, e, lay.gate), 0, f, (i, EXPERT_FC1, e), 0))
                boxes.append(Box(lay.expert(p, e, lay.up), 0, f, (i, EXPERT_FC1, e), f))
                boxes.append(_rows_box(lay.expert(p, e, lay.down), (i, EXPERT_FC2, e), h))
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
            f, lay = shape.ffn_hidden_size, layout(shape.moe_layout)
            out[lay.router(p)] = (shape.num_experts, h)
            if lay.router_bias:
                out[lay.router_bias_name(p)] = (shape.num_experts,)
            for e in range(shape.num_experts):
                out[lay.expert(p, e, lay.gate)] = (f, h)
                out[lay.expert(p, e, lay.down)] = (h, f)
                out[lay.expert(p, e, lay.up)] = (f, h)
            out.update(lay.inert_shapes(p, h, shape.shared_expert_width))
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
    """The HF tensors no megatron tensor maps to: zeros the architecture requires (see hf_moe_layouts)."""
    lay = layout(shape.moe_layout)
    return {name: s for i in shape.moe_layers if shape.is_moe_layer(i)
            for name, s in lay.inert_shapes(f"model.layers.{i}.", shape.hidden_size, shape.shared_expert_width).items()}


def canonical_shapes(boxes: list[Box], hf: dict[str, tuple[int, ...]]) -> dict[Canonical, tuple[int, ...]]:
    """Shape of every canonical megatron tensor, from the boxes and the HF shapes."""
    out: dict[Canonical, tuple[int, ...]] = {}
    for b in boxes:
        rest = tuple(hf[b.hf][1:])
        rows = b.mg_row + b.rows
        have = out.get(b.target)
        out[b.target] = (max(rows, have[0]) if have else rows,) + rest
    return out


def keyed_shapes(canonical: dict[Canonical, tuple[int, ...]], naming: "MegatronNaming") -> dict[str, tuple[int, ...]]:
    """Global shapes of the checkpoint keys holding the canonical tensors under ``naming``."""
    out: dict[str, tuple[int, ...]] = {}
    lead_max: dict[str, list[int]] = {}
    for (layer, name, expert), shape in canonical.items():
        key, lead = naming.key(layer, name, expert)
        have = lead_max.setdefault(key, [0] * len(lead))
        for i, v in enumerate(lead):
            have[i] = max(have[i], v + 1)
        out[key] = shape
    return {key: tuple(lead_max[key]) + tuple(shape) for key, shape in out.items()}


@dataclass(frozen=True)
class MegatronNaming:
    """How a checkpoint names canonical tensors: stacked layers or one key per layer.

    The one place that spells megatron keys; ``upcycle.dense_keys.DenseKeyResolver`` uses it
    to look keys up in a dense checkpoint, tensor by tensor.
    """

    stacked: bool = True
    prefix: str = ""

    def key(self, layer: Optional[int], name: str, expert: Optional[int]) -> tuple[str, tuple[int, ...]]:
        """(checkpoint key, leading offsets) of canonical tensor (layer, name, expert)."""
        if layer is None:
            return self.prefix + name, ()
        lead = (expert,) if expert is not None else ()
        if self.stacked:
            return f"{self.prefix}decoder.layers.{name}", (layer,) + lead
        return f"{self.prefix}decoder.layers.{layer}.{name}", lead

    @classmethod
    def of_keys(cls, keys) -> "MegatronNaming":
        keys = list(keys)
        prefix = "module." if any(k.startswith("module.") for k in keys) else ""
        per_layer = any(_PER_LAYER.match(k) for k in keys)
        return cls(stacked=not per_layer, prefix=prefix)


def parse_megatron_key(key: str) -> tuple[str, bool, int]:
    """(canonical name, whether dim 0 is a stacked layer axis, per-layer index or -1).

    Expert tensors have an expert axis after the layer axis (stacked) or first (per layer).
    """
    m = _PER_LAYER.match(key)
    if m:
        return m.group(3), False, int(m.group(2))
    m = _STACKED.match(key)
    if m and m.group(2) != "final_layernorm.weight":
        return m.group(2), True, -1
    return key[len("module."):] if key.startswith("module.") else key, False, -1


def split_request(key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> Iterator[tuple[Canonical, tuple, tuple, tuple]]:
    """Split a request on a checkpoint key into requests on canonical tensors.

    Yields (canonical, index into the request's target for the leading axes, offsets
    within the canonical tensor, shape within the canonical tensor).
    """
    name, stacked, layer = parse_megatron_key(key)
    if layer < 0 and not stacked:
        yield (None, name, None), (), tuple(offsets), tuple(shape)
        return
    n_lead = (1 if stacked else 0) + (1 if name in EXPERT_NAMES else 0)
    lead_off, lead_len = offsets[:n_lead], shape[:n_lead]
    ranges = [range(o, o + n) for o, n in zip(lead_off, lead_len)]
    import itertools

    for combo in itertools.product(*ranges):
        idx = tuple(c - o for c, o in zip(combo, lead_off))
        rest = list(combo)
        lay = rest.pop(0) if stacked else layer
        expert = rest.pop(0) if name in EXPERT_NAMES else None
        yield (lay, name, expert), idx, tuple(offsets[n_lead:]), tuple(shape[n_lead:])
