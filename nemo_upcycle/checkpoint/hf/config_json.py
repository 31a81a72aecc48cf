"""The ``config.json`` of an exported folder: the model's settings in the target's own keys.

Every target carries the model's RoPE (theta and llama3 scaling), head_dim, tied
embeddings, norm epsilon and the bos/eos/pad ids stated beside the tokenizer;
then the target's MoE keys (experts, top-k, which layers are dense, the routing switch, the
shared expert's width). The routed experts are those megatron-core has (UpcycleSpec: E·G, or
E·(G - S) beside S shared slices, of width F/G, top-T·G or T·(G - S)).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.checkpoint.hf.export_targets import ExportTarget
from nemo_upcycle.checkpoint.hf.moe_layouts import SHARED_EXPERT_RECORD, hf_shared_expert_width
from nemo_upcycle.upcycle.spec import UpcycleSpec


def _common(arch: Architecture, dtype: torch.dtype, token_ids: Optional[dict]) -> dict:
    out = {
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rotary_base,
        "rope_scaling": arch.rope_scaling.hf_config() if arch.rope_scaling else None,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_embeddings,
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


def _qwen_moe(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    routing = spec.router.routing_at_inference(spec.topk)
    return dict(
        moe_intermediate_size=spec.expert_ffn_hidden_size, num_experts=spec.num_experts,
        num_experts_per_tok=spec.topk, norm_topk_prob=routing == "topk_softmax",
        # Every layer is an MoE layer unless listed: decoder_sparse_step=1 and mlp_only_layers.
        decoder_sparse_step=1,
        mlp_only_layers=sorted(set(range(arch.num_layers)) - set(spec.moe_layers)),
        output_router_logits=False, router_aux_loss_coef=float(cfg.router.aux_loss_coeff or 0.0),
        use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers,
    )


def _glm4_moe(arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(
        n_routed_experts=spec.num_experts, num_experts_per_tok=spec.topk,
        moe_intermediate_size=spec.expert_ffn_hidden_size,
        # Layers 0..k-1 dense, the rest MoE (export_targets checked that moe.layers is so).
        first_k_dense_replace=arch.num_layers - len(spec.moe_layers),
        # Shared experts of the routed width F/G: the model's (copy: G of them, slices: S), or
        # one written inert (hf/moe_layouts.py).
        n_shared_experts=hf_shared_expert_width(spec, "glm4_moe") // spec.expert_ffn_hidden_size,
        # One group holding every expert: the group-limited choice is a plain top-k.
        n_group=1, topk_group=1,
        # megatron-core renormalises the chosen sigmoid scores only when k > 1, and scales by nothing.
        norm_topk_prob=spec.topk > 1, routed_scaling_factor=1.0,
        partial_rotary_factor=1.0, attention_bias=arch.qkv_bias, use_qk_norm=arch.qk_layernorm,
        output_router_logits=False,
    )


def _target_keys(target: ExportTarget, cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    if target.name == "mixtral":
        return _mixtral(cfg, spec)
    if target.name == "qwen2_moe":
        # The shared expert Qwen2-MoE always runs: the model's, or written inert (hf/moe_layouts.py).
        return dict(_qwen_moe(cfg, arch, spec), qkv_bias=arch.qkv_bias,
                    shared_expert_intermediate_size=hf_shared_expert_width(spec, "qwen2_moe"))
    if target.name == "qwen3_moe":
        return dict(_qwen_moe(cfg, arch, spec), attention_bias=False)
    if target.name == "glm4_moe":
        return _glm4_moe(arch, spec)
    if target.name == "llama":
        return dict(attention_bias=False, mlp_bias=False)
    if target.name in ("qwen2", "qwen3"):
        extra = dict(attention_bias=False) if target.name == "qwen3" else {}
        return dict(extra, use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)
    raise ValueError(target.name)


def hf_config(cfg: Any, target: ExportTarget, dtype: torch.dtype, token_ids: Optional[dict] = None) -> dict:
    """config.json for ``cfg`` written as ``target``."""
    moe = cfg.moe
    arch, spec = Architecture.of(cfg.model), UpcycleSpec.of(cfg)
    out = _common(arch, dtype, token_ids)
    out.update(architectures=[target.architecture], model_type=target.model_type,
               **_target_keys(target, cfg, arch, spec))
    # Where the configuration came from, for people reading config.json; import reads
    # SHARED_EXPERT_RECORD back (hf/read_back.py: Qwen2-MoE's gate of an ungated shared expert).
    out["nemo_upcycle"] = {
        "model": cfg.model.name, "moe": moe.name, "num_experts": moe.num_experts, "topk": moe.topk,
        "granularity": moe.granularity, "router": cfg.router.type, "family": arch.family,
        "moe_layers": list(spec.moe_layers), "capacity_factor": moe.capacity_factor,
    }
    if spec.has_shared_expert:
        out["nemo_upcycle"][SHARED_EXPERT_RECORD] = shared_expert_record(spec)
    return out


def shared_expert_record(spec: UpcycleSpec) -> dict:
    """How the shared expert was cut from the dense FFN (mode, alpha or S) and whether it is gated."""
    share = {"alpha": spec.shared_alpha} if spec.shared_mode == "copy" else {"slices": spec.shared_slices}
    return {"mode": spec.shared_mode, **share, "gate": spec.shared_gate}
