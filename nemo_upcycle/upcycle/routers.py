"""Every router type the project trains, one row each: adding a router is adding a row.

A row holds what the rest of the code asks about a router: the megatron-core settings that
select it, whether its chosen weights sum to one (which makes upcycling exact at step 0
with identical experts), how expert weights are scaled to keep the FFN's output, the
load-balancing setting it requires and its ``router=<type>`` preset (registered with Hydra
from the row: nemo_upcycle/config/schema.py), and the routing it computes at inference,
one of :data:`ROUTINGS` (which decides the Hugging Face architecture it exports to, and
which router an exported folder reads back as). A router whose inference routing is new
also needs the export targets that compute it to list it (checkpoint/hf/export_targets.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


# What megatron-core can compute at inference, in words (the export's refusals quote them).
ROUTINGS = {
    "topk_softmax": "top-k of the logits, then softmax over the chosen",
    "softmax_topk": "softmax over all experts, then top-k without renormalising",
    "sigmoid_bias": "sigmoid scores with a per-expert selection bias",
    "sigmoid": "the sigmoid of the single chosen logit",
}
# The auxiliary loss's coefficient of a preset balancing with it (the paper's 1e-2).
AUX_LOSS_COEFF = 1e-2


@dataclass(frozen=True)
class RouterRow:
    type: str
    # megatron-core TransformerConfig keywords beyond the common ones (load balancing, losses, dtype).
    megatron: dict = field(default_factory=dict)
    # The chosen weights of one token sum to exactly one (for top-1 too, unless noted below).
    weights_sum_to_one: bool = True
    # ... except with a single chosen expert (a sigmoid score is not 1).
    top1_weight_is_one: bool = True
    # Expert scaling "auto" picks: "cube_root" (outputs shrink by about T/E), "fc2_granularity"
    # when G > 1 (a group's G slices share its weight), or "none".
    auto_scaling: str = "none"
    # router.load_balancing this router requires (None: any of the losses) and what it forbids.
    required_load_balancing: Optional[str] = None
    # Why, for the message when another one is configured ("" : just "needs ...").
    balancing_reason: str = ""
    # The routing megatron-core computes with this router in eval mode, which an exported
    # model must compute (checkpoint/hf/export_targets.py): "topk_softmax" (softmax over the k
    # chosen logits), "softmax_topk" (softmax over all experts, top-k, not renormalised) or
    # "sigmoid_bias" (sigmoid scores, a per-expert bias added for the choice only, the
    # chosen scores renormalised when k > 1); and, when it differs, with one chosen expert.
    inference_routing: str = "topk_softmax"
    inference_routing_top1: Optional[str] = None

    def preset(self) -> dict:
        """``router=<type>``'s values beyond RouterConfig's defaults: its balancing, and the
        auxiliary loss only where it balances with one."""
        balancing = self.required_load_balancing or "aux_loss"
        return dict(type=self.type, load_balancing=balancing,
                    aux_loss_coeff=AUX_LOSS_COEFF if balancing == "aux_loss" else 0.0)

    def megatron_settings(self, router: Any) -> dict:
        return dict(
            moe_router_load_balancing_type=router.load_balancing,
            moe_aux_loss_coeff=router.aux_loss_coeff,
            moe_z_loss_coeff=router.z_loss_coeff,
            moe_router_dtype=router.dtype,
            **self.megatron,
        )

    def routing_at_inference(self, fine_topk: int) -> str:
        """What megatron-core computes in eval mode with ``fine_topk`` (T·G) chosen experts."""
        return self.inference_routing_top1 if fine_topk == 1 and self.inference_routing_top1 else self.inference_routing

    def exact_at_step0(self, fine_topk: int) -> bool:
        """Identical experts reproduce the dense FFN exactly under this routing."""
        return self.weights_sum_to_one and (fine_topk > 1 or self.top1_weight_is_one)


ROUTERS: dict[str, RouterRow] = {
    row.type: row
    for row in (
        # Mixtral's order: top-k of the logits, then softmax over the k chosen (the paper's).
        RouterRow("topk_softmax", dict(moe_router_pre_softmax=False), auto_scaling="fc2_granularity"),
        # Softmax over all experts, then top-k: the k weights sum to about k/E at step 0.
        RouterRow("softmax_topk", dict(moe_router_pre_softmax=True), weights_sum_to_one=False,
                  auto_scaling="cube_root", inference_routing="softmax_topk"),
        # Sinkhorn balancing: megatron-core chooses by the balanced scores during training
        # only; in eval mode (Router.sinkhorn_load_balancing) it takes the top-k of the softmax
        # over all experts, weights not renormalised, or with k = 1 the sigmoid of the top logit.
        RouterRow("sinkhorn", dict(moe_router_pre_softmax=False), weights_sum_to_one=False,
                  required_load_balancing="sinkhorn", inference_routing="softmax_topk",
                  inference_routing_top1="sigmoid"),
        # DeepSeek-V3's auxiliary-loss-free balancing: sigmoid scores, a bias updated from the load.
        RouterRow("aux_free", dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                   moe_router_bias_update_rate=1e-3),
                  top1_weight_is_one=False, auto_scaling="fc2_granularity", required_load_balancing="none",
                  balancing_reason="balances with an expert bias", inference_routing="sigmoid_bias"),
    )
}
ROUTER_TYPES = tuple(ROUTERS)


def router_computing(routing: str) -> str:
    """The first router type (in :data:`ROUTERS`' order) that computes ``routing`` at inference
    with k > 1: what a Hugging Face folder computing it reads back as."""
    for row in ROUTERS.values():
        if row.inference_routing == routing:
            return row.type
    raise ValueError(f"no router computes {ROUTINGS.get(routing, routing)} at inference")


def router_row(router_type: str) -> RouterRow:
    try:
        return ROUTERS[router_type]
    except KeyError:
        raise ValueError(f"unknown router.type {router_type!r}: one of {', '.join(ROUTER_TYPES)}") from None
