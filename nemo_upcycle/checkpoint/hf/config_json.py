"""The ``config.json`` of an exported folder: the model's settings in the target's own keys.

Every target carries the model's RoPE (theta and llama3 scaling), head_dim, tied
embeddings, norm epsilon and the bos/eos/pad ids stated beside the tokenizer;
then the target's MoE keys (experts, top-k, which layers are dense, the routing switch).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.architecture import effective_head_dim, rope_scaling_of
from nemo_upcycle.checkpoint.hf.export_targets import ExportTarget
from nemo_upcycle.checkpoint.hf.moe_layouts import INERT_SHARED_EXPERT_WIDTH
from nemo_upcycle.upcycle.spec import UpcycleSpec


def _common(cfg: Any, dtype: torch.dtype, token_ids: Optional[dict]) -> dict:
    m = cfg.model
    out = {
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": effective_head_dim(m),
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": float(m.norm_eps),
        "rope_theta": float(m.rotary_base),
        "rope_scaling": rope_scaling_of(m),
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    out.update(token_ids or {})
    return out


def _mixtral(cfg: Any, spec: UpcycleSpec) -> dict:
    return dict(intermediate_size=spec.expert_ffn_hidden_size, num_local_experts=spec.num_experts,
                num_experts_per_tok=spec.topk, output_router_logits=False,
                router_aux_loss_coef=float(cfg.router.aux_loss_coeff or 0.0), router_jitter_noise=0.0,
                sliding_window=None)


def _qwen_moe(cfg: Any, spec: UpcycleSpec) -> dict:
    routing = spec.router.routing_at_inference(spec.topk)
    return dict(
        moe_intermediate_size=spec.expert_ffn_hidden_size, num_experts=spec.num_experts,
        num_experts_per_tok=spec.topk, norm_topk_prob=routing == "topk_softmax",
        # Every layer is an MoE layer unless listed: decoder_sparse_step=1 and mlp_only_layers.
        decoder_sparse_step=1,
        mlp_only_layers=sorted(set(range(cfg.model.num_layers)) - set(spec.moe_layers)),
        output_router_logits=False, router_aux_loss_coef=float(cfg.router.aux_loss_coeff or 0.0),
        use_sliding_window=False, sliding_window=None, max_window_layers=cfg.model.num_layers,
    )


def _glm4_moe(cfg: Any, spec: UpcycleSpec) -> dict:
    m = cfg.model
    return dict(
        n_routed_experts=spec.num_experts, num_experts_per_tok=spec.topk,
        moe_intermediate_size=spec.expert_ffn_hidden_size,
        # Layers 0..k-1 dense, the rest MoE (export_targets checked that moe.layers is so).
        first_k_dense_replace=m.num_layers - len(spec.moe_layers),
        # One ungated shared expert of the routed width, written inert (hf/moe_layouts.py).
        n_shared_experts=1,
        # One group holding every expert: the group-limited choice is a plain top-k.
        n_group=1, topk_group=1,
        # megatron-core renormalises the chosen sigmoid scores only when k > 1, and scales by nothing.
        norm_topk_prob=spec.topk > 1, routed_scaling_factor=1.0,
        partial_rotary_factor=1.0, attention_bias=bool(m.qkv_bias), use_qk_norm=bool(m.qk_layernorm),
        output_router_logits=False,
    )


def _target_keys(target: ExportTarget, cfg: Any) -> dict:
    spec = UpcycleSpec.of(cfg)
    if target.name == "mixtral":
        return _mixtral(cfg, spec)
    if target.name == "qwen2_moe":
        # The shared expert Qwen2-MoE always runs is written inert (hf/moe_layouts.py).
        return dict(_qwen_moe(cfg, spec), qkv_bias=bool(cfg.model.qkv_bias),
                    shared_expert_intermediate_size=INERT_SHARED_EXPERT_WIDTH)
    if target.name == "qwen3_moe":
        return dict(_qwen_moe(cfg, spec), attention_bias=False)
    if target.name == "glm4_moe":
        return _glm4_moe(cfg, spec)
    if target.name == "llama":
        return dict(attention_bias=False, mlp_bias=False)
    if target.name in ("qwen2", "qwen3"):
        extra = dict(attention_bias=False) if target.name == "qwen3" else {}
        return dict(extra, use_sliding_window=False, sliding_window=None, max_window_layers=cfg.model.num_layers)
    raise ValueError(target.name)


def hf_config(cfg: Any, target: ExportTarget, dtype: torch.dtype, token_ids: Optional[dict] = None) -> dict:
    """config.json for ``cfg`` written as ``target``."""
    m, moe = cfg.model, cfg.moe
    out = _common(cfg, dtype, token_ids)
    out.update(architectures=[target.architecture], model_type=target.model_type, **_target_keys(target, cfg))
    # Where the configuration came from, for people reading config.json.
    out["nemo_upcycle"] = {
        "model": m.name, "moe": moe.name, "num_experts": moe.num_experts, "topk": moe.topk,
        "granularity": moe.granularity, "router": cfg.router.type, "family": getattr(m, "family", "llama"),
        "moe_layers": list(UpcycleSpec.of(cfg).moe_layers), "capacity_factor": moe.capacity_factor,
    }
    return out
