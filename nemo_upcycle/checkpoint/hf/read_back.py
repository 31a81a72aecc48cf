"""Hugging Face MoE folders read back into megatron-core MoE checkpoints (``import_dense``).

The formats nemo-upcycle exports (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4-MoE) are each a dense
family's attention plus MoE FFNs; this module says which family, which layers are MoE layers,
the expert width and the megatron-core settings (experts, top-k, granularity, router, shared
expert) whose checkpoint layout holds the folder's tensors. ``config.json`` states all but the
shared expert, which its tensors decide (:func:`read_shared_expert`): a zero down projection in
every MoE layer is an inert one (none in megatron-core), a live one is megatron-core's
``moe.shared_expert`` as hf/moe_layouts.py writes it. A folder with something megatron-core's
MoE here cannot hold (a shared expert of another width, a routing with no router row) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from nemo_upcycle.checkpoint.architecture import MOE_READ_BACK, stated_by_hf_config
from nemo_upcycle.checkpoint.hf.moe_layouts import GATED, INERT, SHARED_EXPERT_RECORD, UNGATED, layout
from nemo_upcycle.errors import UserError
from nemo_upcycle.upcycle.routers import router_computing


class MoeFolderError(UserError):
    """An MoE folder whose model megatron-core's MoE here cannot represent exactly."""


@dataclass
class MoeReadBack:
    num_experts: int = 0  # per MoE layer, as megatron-core counts them (E·G)
    topk: int = 0
    moe_layers: list = field(default_factory=list)
    expert_ffn_hidden_size: int = 0
    dense_ffn_hidden_size: int = 0
    granularity: int = 1
    router: str = "topk_softmax"
    layout: str = "mixtral"
    shared_expert_width: int = 1  # of the HF shared expert, live or inert
    # megatron-core's shared expert (moe.shared_expert.*): none, copy (the dense FFN) or slices
    # (S of its G slices); gated by a sigmoid or not. Set by read_shared_expert.
    shared_mode: str = "none"
    shared_slices: int = 0
    shared_gate: bool = False

    @property
    def shared_expert(self) -> str:
        """How the folder's shared expert holds megatron-core's (hf/moe_layouts.py)."""
        if self.shared_mode == "none":
            return INERT
        return GATED if self.shared_gate else UNGATED

    @property
    def routed_slices(self) -> int:
        """Slices of the dense FFN each group of routed experts holds: G, or G - S beside S shared ones."""
        return self.granularity - self.shared_slices

    def coarse(self) -> tuple[int, int]:
        """(moe.num_experts, moe.topk) of the configuration with this granularity and shared expert."""
        return self.num_experts // self.routed_slices, self.topk // self.routed_slices

    def shared_overrides(self) -> list[str]:
        """The ``moe.shared_expert.*`` overrides of the configuration (none without a shared expert)."""
        if self.shared_mode == "none":
            return []
        return ([f"moe.shared_expert.mode={self.shared_mode}", f"moe.shared_expert.gate={str(self.shared_gate).lower()}"]
                + ([f"moe.shared_expert.slices={self.shared_slices}"] if self.shared_mode == "slices" else []))


def _family(config: dict) -> str:
    if config["model_type"] == "mixtral":
        return "llama"
    if config["model_type"] == "qwen2_moe":
        # Written for a Llama with qkv_bias=false; transformers' default is the Qwen2 attention.
        return "qwen2" if config.get("qkv_bias", True) else "llama"
    if config["model_type"] == "glm4_moe":
        # attention_bias is on q/k/v only (Qwen2's), use_qk_norm is Qwen3's q/k norm.
        return "qwen3" if config.get("use_qk_norm") else "qwen2" if config.get("attention_bias") else "llama"
    return "qwen3"


def _glm4_moe(config: dict, where: str) -> MoeReadBack:
    """GLM-4-MoE as nemo-upcycle writes it: megatron-core's sigmoid router with an expert bias."""
    layers, experts, topk = int(config["num_hidden_layers"]), int(config["n_routed_experts"]), int(config["num_experts_per_tok"])
    problems = [f"{k}={config.get(k)} (megatron-core's router here computes {v})" for k, v in
                (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0), ("norm_topk_prob", topk > 1))
                if config.get(k) != v]
    if problems:
        raise MoeFolderError(f"{where}: a GLM-4-MoE routing megatron-core's {router_computing('sigmoid_bias')} "
                             "router does not compute: "
                             + "; ".join(problems))
    width, k = int(config["moe_intermediate_size"]), int(config.get("first_k_dense_replace", 0) or 0)
    return MoeReadBack(experts, topk, list(range(k, layers)), width, int(config["intermediate_size"]),
                       router=router_computing("sigmoid_bias"), layout="glm4_moe",
                       shared_expert_width=width * int(config.get("n_shared_experts", 0) or 0))


def _qwen_moe_layers(config: dict, layers: int, experts: int) -> list[int]:
    """transformers' rule (Qwen2MoeDecoderLayer): MoE unless in mlp_only_layers, every decoder_sparse_step-th."""
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    return [i for i in range(layers) if experts > 0 and i not in dense and (i + 1) % step == 0]


def read_back(config: dict, where: str) -> tuple[dict, MoeReadBack]:
    """(the dense family's config.json to state the architecture from, the MoE settings)."""
    model_type, layers = config["model_type"], int(config["num_hidden_layers"])
    if model_type == "mixtral":
        experts, width = int(config.get("num_local_experts", 0) or 0), int(config["intermediate_size"])
        moe = MoeReadBack(experts, int(config.get("num_experts_per_tok", 2) or 2), list(range(layers)), width, width)
        return dict(config, model_type="llama"), moe
    family = _family(config)
    if model_type == "glm4_moe":
        moe = _glm4_moe(config, where)
        config = {k: v for k, v in config.items() if k != "attention_bias"}  # q/k/v only: the family says it
    else:
        experts = int(config.get("num_experts", 0) or 0)
        moe = MoeReadBack(experts, int(config["num_experts_per_tok"]), _qwen_moe_layers(config, layers, experts),
                          int(config["moe_intermediate_size"]), int(config["intermediate_size"]),
                          router=router_computing("topk_softmax" if config.get("norm_topk_prob") else "softmax_topk"), layout=model_type,
                          shared_expert_width=int(config.get("shared_expert_intermediate_size") or 0))
    width, dense_width = moe.expert_ffn_hidden_size, moe.dense_ffn_hidden_size
    if len(moe.moe_layers) < layers:
        # The layers left dense keep the dense width F; megatron-core's experts are F/G wide
        # (check_counts, once the shared expert is known, checks G, or G - S, divides the experts).
        if dense_width % width:
            raise MoeFolderError(
                f"{where}: moe_intermediate_size={width} does not divide intermediate_size={dense_width}; "
                "megatron-core's MoE here cannot hold these dense and expert widths together")
        moe.granularity = dense_width // width
    else:
        moe.dense_ffn_hidden_size = width  # no layer is dense: the experts' width is the model's FFN width
    return dict(config, model_type=family, intermediate_size=moe.dense_ffn_hidden_size), moe


def stated_by_hf_folder_config(config: dict, where: str = "config.json") -> tuple[dict, Optional[MoeReadBack]]:
    """(the architecture, its MoE settings or None) of a Hugging Face folder's ``config.json``: a
    dense family, or an MoE type nemo-upcycle writes, read as its dense family plus experts."""
    moe = None
    if config.get("model_type") in MOE_READ_BACK:
        config, moe = read_back(config, where)
    return stated_by_hf_config(config, where), moe


def check_counts(moe: MoeReadBack, where) -> None:
    """The routed experts and top-k are whole groups of G (G - S beside S shared slices) experts of
    width F/G, as megatron-core's granular experts are (upcycle/spec.py)."""
    groups = moe.routed_slices
    if moe.num_experts % groups or moe.topk % groups:
        of = (f"G - S = {moe.granularity} - {moe.shared_slices} routed slices" if moe.shared_mode == "slices"
              else f"granularity G = {moe.granularity}")
        raise MoeFolderError(
            f"{where}: num_experts={moe.num_experts} and num_experts_per_tok={moe.topk} are not multiples of "
            f"{groups} ({of}, from intermediate_size={moe.dense_ffn_hidden_size} / moe_intermediate_size="
            f"{moe.expert_ffn_hidden_size}); megatron-core's MoE here cannot hold these widths and counts together")


def _tensor(folder, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(folder.tensors[name][0]), framework="pt") as f:
        return f.get_tensor(name)


def read_shared_expert(folder, shape, moe: MoeReadBack, config: dict, where) -> MoeReadBack:
    """``moe`` with the folder's shared expert, from its tensors (read one at a time, before
    anything is written): inert in every MoE layer (zero down projection, checked as
    :func:`check_inert`), or live in every one, megatron-core's ``moe.shared_expert``:

    * its width says the mode: intermediate_size (the dense FFN's, F) is a copy, S times
      moe_intermediate_size (F/G) with S < G is S slices;
    * gated on Qwen2-MoE, unless ``config.json`` records the model as ungated and the gate is
      zero (the fixed gate of hf/moe_layouts.py: its down projection is halved back on import).
      A gate trained off zero after the export is read as the gated model the folder computes.
    """
    lay = layout(shape.moe_layout)
    downs = [lay.shared_proj(f"model.layers.{i}.", lay.down) for i in shape.moe_layers] if lay.shared else []
    live = [name for name in downs if bool(_tensor(folder, name).any())]
    if not live:
        check_inert(folder, shape, where)
        check_counts(moe, where)
        return moe
    if len(live) < len(downs):
        raise MoeFolderError(
            f"{where} has a live shared expert in {len(live)} of its {len(downs)} MoE layers ({live[0]} non-zero, "
            f"{next(n for n in downs if n not in live)} zero): megatron-core's MoE here has a shared expert in every "
            "MoE layer or in none")
    dense, width, shared = int(config["intermediate_size"]), moe.expert_ffn_hidden_size, moe.shared_expert_width
    granularity = dense // width if dense % width == 0 else 0
    if granularity and shared == dense:
        moe = replace(moe, shared_mode="copy", shared_slices=0)
    elif granularity and shared % width == 0 and 0 < shared // width < granularity:
        moe = replace(moe, shared_mode="slices", shared_slices=shared // width)
    else:
        raise MoeFolderError(
            f"{where} has a live shared expert of width {shared}: megatron-core's shared expert here is the dense "
            f"FFN (intermediate_size={dense}) or S < G of its G slices of the routed width (moe_intermediate_size="
            f"{width}), so this model cannot be imported exactly")
    moe = replace(moe, granularity=granularity, dense_ffn_hidden_size=dense,
                  shared_gate=lay.shared_gate is not None and not _fixed_gate(folder, shape, config))
    check_counts(moe, where)
    return moe


def _fixed_gate(folder, shape, config: dict) -> bool:
    """A Qwen2-MoE folder's shared expert gate is the fixed zero of an ungated model (hf/moe_layouts.py)."""
    record = (config.get("nemo_upcycle") or {}).get(SHARED_EXPERT_RECORD) or {}
    if record.get("gate", True):
        return False
    lay = layout(shape.moe_layout)
    return not any(bool(_tensor(folder, lay.shared_gate_name(f"model.layers.{i}.")).any()) for i in shape.moe_layers)


def check_inert(folder, shape, where) -> None:
    """Refuse a folder whose inert shared expert would contribute after all.

    A zero down projection makes the shared expert's output exactly 0 for finite inputs; its
    other tensors must be finite (0 times inf is NaN). The tensors are read one at a time.
    """
    from nemo_upcycle.checkpoint.hf.mapping import inert_shapes, zero_tensors

    zeros, live = set(zero_tensors(shape)), []
    for name in inert_shapes(shape):
        t = _tensor(folder, name)
        if not bool(torch.isfinite(t).all()) or (name in zeros and bool(t.any())):
            live.append(name)
    if live:
        raise MoeFolderError(
            f"{where} has a live shared expert ({', '.join(live[:3])}{' ...' if len(live) > 3 else ''} "
            "not finite, beside a zero down projection): it does not add exactly 0, so this model cannot be "
            "imported exactly")
