"""The ``config.json`` of an exported folder: the model's settings in the target's own keys.

Every target carries the model's RoPE (theta and llama3 scaling), head_dim, tied
embeddings, norm epsilon and the bos/eos/pad ids stated beside the tokenizer;
then the target's own keys (its row's ``config_keys`` in checkpoint/hf/export_targets.py:
experts, top-k, which layers are dense, the routing switch, the shared expert's width). The routed experts are those megatron-core has (UpcycleSpec: E·G, or
E·(G - S) beside S shared slices, of width F/G, top-T·G or T·(G - S)).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.checkpoint.hf.export_targets import ExportTarget
from nemo_upcycle.checkpoint.hf.moe_layouts import SHARED_EXPERT_RECORD
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


def hf_config(cfg: Any, target: ExportTarget, dtype: torch.dtype, token_ids: Optional[dict] = None) -> dict:
    """config.json for ``cfg`` written as ``target``."""
    moe = cfg.moe
    arch, spec = Architecture.of(cfg.model), UpcycleSpec.of(cfg)
    out = _common(arch, dtype, token_ids)
    out.update(architectures=[target.architecture], model_type=target.model_type,
               **target.config_keys(cfg, arch, spec))
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
