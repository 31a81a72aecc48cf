"""Model FLOPs per token, the standard accounting behind MFU.

Counts the matrix multiplications of the model (2 FLOPs per multiply-add) and nothing else:
no recomputation, no norms/softmax/communication (Narayanan et al. 2021; Kaplan et al. 2020;
PaLM's MFU definition). Training costs 3x the forward (backward = 2x: gradients with respect
to inputs and to weights).

Per token and layer, forward (H hidden, n heads, g query groups, d head dim, s sequence):
  qkv          2*H*(n + 2g)*d          (GQA: g key/value heads)
  scores+ctx   2*2*n*d*s               (Q K^T and P V over the whole sequence; causal masking
                                        is not discounted, as in megatron's MFU reports)
  proj         2*n*d*H
  dense FFN    2*3*H*F                 (SwiGLU: gate, up, down)
  MoE FFN      2*H*E*G                 (router) + top-k: 2*3*H*(F/G) * T*G = 2*3*H*F*T
  shared       2*3*H*W (+ 2*H gated)   (moe.shared_expert of width W, for every token; the
                                        routed top-k is then T*(G-S) of width F/G in slices mode)
Per token, once: logits 2*H*V (the embedding lookup costs nothing).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.planner.layout import moe_layer_flags, moe_spec
from nemo_upcycle.planner.params import shared_expert_params


@dataclass
class FlopsPerToken:
    """Forward FLOPs per token; ``training`` is 3x the forward."""

    attention_projections: float
    attention_scores: float
    dense_ffn: float
    router: float
    experts: float  # the routed top-k
    logits: float
    shared_expert: float = 0.0  # 0 without one

    @property
    def forward(self) -> float:
        return (self.attention_projections + self.attention_scores + self.dense_ffn
                + self.router + self.experts + self.shared_expert + self.logits)

    @property
    def training(self) -> float:
        return 3 * self.forward

    def as_dict(self) -> dict:
        # Without a shared expert the key is left out: such plans read as they did before it existed.
        terms = {k: v for k, v in asdict(self).items() if k != "shared_expert" or v}
        return dict(terms, forward=self.forward, training=self.training)


def flops_per_token(cfg: Any, seq_length: int, dense: bool = False) -> FlopsPerToken:
    """Of the upcycled model, or with ``dense=True`` of the dense model it starts from."""
    arch, spec = Architecture.of(cfg.model), moe_spec(cfg)
    H, F, V = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    n, g = arch.num_attention_heads, arch.num_query_groups
    d = arch.head_dim
    L = arch.num_layers
    flags = [False] * L if dense else moe_layer_flags(cfg)
    n_moe = sum(flags)
    n_dense = L - n_moe
    experts = spec.num_experts if spec else 0
    # The T*G chosen experts are F/G wide: together as wide as T dense FFNs (T*(G-S) of them
    # beside S shared slices).
    routed_width = spec.topk * spec.expert_ffn_hidden_size if spec else 0
    # One multiply-add per weight of the shared expert (its gate's too): 2 FLOPs each.
    shared = 2 * shared_expert_params(spec) if spec else 0
    return FlopsPerToken(
        attention_projections=L * (2 * H * (n + 2 * g) * d + 2 * n * d * H),
        attention_scores=L * 2 * 2 * n * d * seq_length,
        dense_ffn=n_dense * 2 * 3 * H * F,
        router=n_moe * 2 * H * experts,
        experts=n_moe * 2 * 3 * H * routed_width,
        logits=2 * H * V,
        shared_expert=n_moe * shared,
    )
