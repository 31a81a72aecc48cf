"""What a Megatron-LM checkpoint iteration states: the training arguments in its ``common.pt``.

Megatron-LM saves its ``argparse.Namespace`` there. It is read with ``weights_only=True``
(only the Namespace class is allowed besides tensors and plain values), so nothing in the
file can run code; arguments that hold other objects make it unreadable, and then only
the tensor shapes speak (the message asks for the rest on the command line).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nemo_upcycle.checkpoint.architecture import ArchitectureError, LLAMA3_ROPE_DEFAULTS


def _load_args(common: Path):
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(common, map_location="cpu", weights_only=True)
    except Exception:  # unpicklable extras: fall back to the shapes
        return None
    return data.get("args") if isinstance(data, dict) else None


def stated_by_megatron_lm_args(common: Path) -> dict:
    args = _load_args(common)
    if args is None:
        return {}
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    problems = []
    if get("normalization", "RMSNorm") != "RMSNorm":
        problems.append(f"normalization={get('normalization')}")
    if not get("swiglu", True):
        problems.append("swiglu=False (only SwiGLU FFNs are supported)")
    if get("position_embedding_type", "rope") != "rope":
        problems.append(f"position_embedding_type={get('position_embedding_type')}")
    if get("add_bias_linear", False):
        problems.append("add_bias_linear=True (biases on every linear layer)")
    if problems:
        raise ArchitectureError(f"{common}: Megatron-LM arguments nemo-upcycle cannot reproduce: " + "; ".join(problems))
    heads = get("num_attention_heads")
    out = dict(
        num_layers=get("num_layers"), hidden_size=get("hidden_size"), ffn_hidden_size=get("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=get("num_query_groups") if get("group_query_attention") else heads,
        head_dim=get("kv_channels"), max_position_embeddings=get("max_position_embeddings"),
        rotary_base=float(get("rotary_base", 10000)), norm_eps=get("norm_epsilon"),
        tie_embeddings=not get("untie_embeddings_and_output_weights", False),
        qkv_bias=bool(get("add_qkv_bias", False)), qk_layernorm=bool(get("qk_layernorm", False)),
    )
    # Megatron-LM's --use-rope-scaling is megatron-core's scaling: only the factor is free.
    factor = get("rope_scaling_factor", 8.0) if get("use_rope_scaling") else None
    out.update(rope_scaling_factor=factor, **LLAMA3_ROPE_DEFAULTS)
    return {k: v for k, v in out.items() if v is not None or k == "rope_scaling_factor"}
