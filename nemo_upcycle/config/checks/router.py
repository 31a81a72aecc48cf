"""The ``router.*`` settings against the router table and megatron-core's routing rules.

What a router requires (its load balancing, whether a single chosen expert's weight is
always one) is read from :data:`nemo_upcycle.upcycle.routers.ROUTERS`, so a new router row
is checked without a new rule here.
"""
from __future__ import annotations

from typing import Any, Optional

from nemo_upcycle.config.checks.moe import counting_spec
from nemo_upcycle.upcycle.routers import ROUTER_TYPES, ROUTERS, RouterRow

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")


def name_problems(cfg: Any) -> list[str]:
    router = cfg.router
    problems = []
    if router.type not in ROUTER_TYPES:
        problems.append(f"router.type={router.type} must be one of {ROUTER_TYPES}")
    if router.load_balancing not in LOAD_BALANCING:
        problems.append(f"router.load_balancing={router.load_balancing} must be one of {LOAD_BALANCING}")
    return problems


def balancing_problems(cfg: Any) -> list[str]:
    """Each router's required load balancing, and Sinkhorn's, which is a routing, not a loss."""
    router = cfg.router
    row: Optional[RouterRow] = ROUTERS.get(router.type)
    need = row.required_load_balancing if row is not None else None
    problems = []
    if need is not None and router.load_balancing != need:
        problems.append(f"router.type={router.type} {row.balancing_reason}: set router.load_balancing={need}"
                        if row.balancing_reason else
                        f"router.type={router.type} needs router.load_balancing={need} (got {router.load_balancing})")
    if need == "sinkhorn" and router.aux_loss_coeff:
        problems.append(
            f"router.type={router.type} balances by construction: set router.aux_loss_coeff=0 "
            f"(got {router.aux_loss_coeff})"
        )
    if router.load_balancing == "sinkhorn" and need != "sinkhorn":
        problems.append(
            f"router.load_balancing=sinkhorn is only valid with router.type=sinkhorn "
            f"(got router.type={router.type})"
        )
    return problems


def sinkhorn_dropping_problems(cfg: Any) -> list[str]:
    # megatron-core's TransformerConfig rejects this, but only once the model is built.
    if cfg.moe.capacity_factor is None or cfg.router.load_balancing != "sinkhorn":
        return []
    return [
        f"moe.capacity_factor={cfg.moe.capacity_factor} does not work with router.load_balancing="
        "sinkhorn (megatron-core drops tokens only with aux_loss, seq_aux_loss, global_aux_loss "
        "or none); sinkhorn balances by construction: set moe.capacity_factor=null"
    ]


def single_weight_is_one(row: RouterRow) -> bool:
    """A router whose chosen weights sum to one gives a lone chosen expert the weight 1."""
    return row.weights_sum_to_one and row.top1_weight_is_one


def top1_problems(cfg: Any) -> list[str]:
    """Top-1 routing (counted in fine-grained experts) needs a weight the router can learn."""
    row = ROUTERS.get(cfg.router.type)  # an unknown type is reported by name_problems
    if row is None or counting_spec(cfg).topk != 1 or not single_weight_is_one(row):
        return []
    learnable = [r.type for r in ROUTERS.values() if not single_weight_is_one(r)]
    return [
        f"moe.topk=1 with router.type={row.type}: a softmax over the one chosen expert is "
        "always 1, so the router would get no gradient (megatron-core refuses it); use "
        f"router={', '.join(learnable[:-1])} or {learnable[-1]}"
    ]


def router_problems(cfg: Any) -> list[str]:
    """Every ``router.*`` problem of an MoE job (moe=dense has no router)."""
    if cfg.moe.num_experts <= 0:
        return []
    problems = name_problems(cfg) + balancing_problems(cfg)
    if cfg.router.init_std < 0:
        problems.append(f"router.init_std={cfg.router.init_std} must be >= 0")
    return problems + sinkhorn_dropping_problems(cfg) + top1_problems(cfg)
