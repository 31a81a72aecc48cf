"""Mapping between Hugging Face Llama tensors and megatron-core GPTModel parameters."""
from __future__ import annotations

from typing import Callable, Iterator

import torch


def qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """megatron's fused QKV: per query group, that group's query heads, then its key, then its value."""
    head_dim = q.shape[0] // heads
    hidden = q.shape[1]
    q = q.view(groups, heads // groups, head_dim, hidden)
    k = k.view(groups, 1, head_dim, hidden)
    v = v.view(groups, 1, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_to_hf(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = qkv.shape[1]
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    per_group = heads // groups
    grouped = qkv.view(groups, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(-1, hidden)
    k = grouped[:, per_group].reshape(-1, hidden)
    v = grouped[:, per_group + 1].reshape(-1, hidden)
    return q, k, v


def megatron_param_tensors(
    get: Callable[[str], torch.Tensor], num_layers: int, heads: int, groups: int, tied: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron parameter name, tensor) for a dense Llama, reading HF tensors lazily via ``get``.

    One layer's tensors are produced at a time, so a caller that writes and drops each one
    keeps memory near one layer.
    """
    yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
    for i in range(num_layers):
        hf = f"model.layers.{i}."
        mc = f"decoder.layers.{i}."
        yield mc + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        yield mc + "self_attention.linear_qkv.weight", qkv_from_hf(
            get(hf + "self_attn.q_proj.weight"), get(hf + "self_attn.k_proj.weight"),
            get(hf + "self_attn.v_proj.weight"), heads, groups,
        )
        yield mc + "self_attention.linear_proj.weight", get(hf + "self_attn.o_proj.weight")
        yield mc + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        yield mc + "mlp.linear_fc1.weight", torch.cat(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0
        )
        yield mc + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not tied:
        yield "output_layer.weight", get("lm_head.weight")
