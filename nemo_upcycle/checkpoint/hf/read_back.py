"""Hugging Face MoE folders read back into megatron-core MoE checkpoints (``import_dense``).

The formats nemo-upcycle exports (Mixtral, Qwen2-MoE, Qwen3-MoE) are each a dense family's
attention plus MoE FFNs; this module says which family, which layers are MoE layers, the
expert width and the megatron-core settings (experts, top-k, granularity, router) whose
checkpoint layout holds the folder's tensors. A folder with something megatron-core's MoE
here cannot hold (a live Qwen2-MoE shared expert, a routing with no router row) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.checkpoint.architecture import MOE_READ_BACK, stated_by_hf_config
from nemo_upcycle.errors import UserError


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
    shared_expert_width: int = 1

    def coarse(self) -> tuple[int, int]:
        """(moe.num_experts, moe.topk) of the configuration with this granularity."""
        return self.num_experts // self.granularity, self.topk // self.granularity


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
        raise MoeFolderError(f"{where}: a GLM-4-MoE routing megatron-core's aux_free router does not compute: "
                             + "; ".join(problems))
    width, k = int(config["moe_intermediate_size"]), int(config.get("first_k_dense_replace", 0) or 0)
    return MoeReadBack(experts, topk, list(range(k, layers)), width, int(config["intermediate_size"]),
                       router="aux_free", layout="glm4_moe",
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
                          router="topk_softmax" if config.get("norm_topk_prob") else "softmax_topk", layout=model_type,
                          shared_expert_width=int(config.get("shared_expert_intermediate_size") or 0))
    experts, width, dense_width = moe.num_experts, moe.expert_ffn_hidden_size, moe.dense_ffn_hidden_size
    if len(moe.moe_layers) < layers:
        # The layers left dense keep the dense width F; megatron-core's experts are F/G wide.
        if dense_width % width or experts % (dense_width // width) or moe.topk % (dense_width // width):
            raise MoeFolderError(
                f"{where}: moe_intermediate_size={width} does not divide intermediate_size={dense_width} into "
                f"a granularity that divides num_experts={experts} and num_experts_per_tok={moe.topk}; "
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


def check_inert(folder, shape, where: Path) -> None:
    """Refuse a folder whose shared expert contributes: megatron-core's MoE here has none.

    A zero down projection makes the shared expert's output exactly 0 for finite inputs; its
    other tensors must be finite (0 times inf is NaN). The tensors are read one at a time.
    """
    from safetensors import safe_open

    from nemo_upcycle.checkpoint.hf.mapping import inert_shapes
    from nemo_upcycle.checkpoint.hf.moe_layouts import layout

    zero_suffix, live = layout(shape.moe_layout).zero_suffix, []
    for name in inert_shapes(shape):
        with safe_open(str(folder.tensors[name][0]), framework="pt") as f:
            t = f.get_tensor(name)
        if not bool(torch.isfinite(t).all()) or (name.endswith(zero_suffix) and bool(t.any())):
            live.append(name)
    if live:
        raise MoeFolderError(
            f"{where} has a live shared expert ({', '.join(live[:3])}{' ...' if len(live) > 3 else ''} "
            "non-zero or not finite): megatron-core's MoE here has no shared expert, so this model cannot be "
            "imported exactly. nemo-upcycle reads back the folders it writes, whose shared expert is "
            "inert (down_proj zero)")
