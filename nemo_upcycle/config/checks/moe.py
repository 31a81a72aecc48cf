"""The ``moe.*`` settings: experts, granularity, token dropping, which layers, initialisation.

The fine-grained counts (E·G experts of width F/G, top-T·G) come from
:class:`~nemo_upcycle.upcycle.spec.UpcycleSpec`, like everywhere else.
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from nemo_upcycle.config.moe_layers import MoELayerSpecError, moe_layer_indices
from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel
from nemo_upcycle.upcycle.routers import ROUTER_TYPES
from nemo_upcycle.upcycle.spec import UpcycleSpec

DROP_POLICIES = ("probs", "position")


def counting_spec(cfg: Any) -> UpcycleSpec:
    """The job's UpcycleSpec, for its expert counts.

    An invalid ``moe.layers`` or ``router.type`` (each reported by its own check) does not
    change the counts, so they are then taken with valid stand-ins: every problem is still
    reported at once.
    """
    try:
        return UpcycleSpec.of(cfg)
    except (MoELayerSpecError, ValueError):
        stand_ins = {"moe": {"layers": "all"}, "router": {"type": ROUTER_TYPES[0]}}
        return UpcycleSpec.of(OmegaConf.merge(cfg, stand_ins))


def expert_problems(cfg: Any) -> list[str]:
    """How many experts, how wide, and how they split over the expert-parallel ranks."""
    model, moe, par = cfg.model, cfg.moe, cfg.parallel
    problems = []
    if moe.topk < 1 or moe.topk > moe.num_experts:
        problems.append(f"moe.topk={moe.topk} must be between 1 and moe.num_experts={moe.num_experts}")
    if moe.granularity < 1:
        problems.append(f"moe.granularity={moe.granularity} must be >= 1")
    elif model.ffn_hidden_size % moe.granularity:
        problems.append(
            f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by "
            f"moe.granularity={moe.granularity}; each granular expert takes an equal slice"
        )
    if shared_expert_problems(cfg):
        return problems  # the counts below depend on a valid shared expert
    spec = counting_spec(cfg)
    if spec.num_experts % par.ep:
        routed = (f"x {spec.routed_slices} routed slices" if spec.shared_mode == "slices"
                  else f"x granularity {moe.granularity}")
        problems.append(
            f"moe.num_experts={moe.num_experts} ({routed} = "
            f"{spec.num_experts} experts) is not divisible by parallel.ep={par.ep}; "
            "pick an ep that divides the number of experts"
        )
    etp = expert_tensor_parallel(par)
    if spec.granularity >= 1 and spec.expert_ffn_hidden_size % etp:
        problems.append(
            f"expert FFN width {spec.expert_ffn_hidden_size} is not "
            f"divisible by the expert tensor-parallel size {etp} (parallel.etp)"
        )
    return problems


SHARED_EXPERT_MODES = ("none", "copy", "slices")


def shared_expert_problems(cfg: Any) -> list[str]:
    """``moe.shared_expert.*``: a known mode, alpha in (0, 1), S of the G slices with G - S left to
    route, a width tensor parallelism divides (the shared expert is tensor-parallel)."""
    moe, shared = cfg.moe, cfg.moe.shared_expert
    if shared.mode not in SHARED_EXPERT_MODES:
        return [f"moe.shared_expert.mode={shared.mode} must be one of {', '.join(SHARED_EXPERT_MODES)}"]
    if shared.mode == "none":
        return ["moe.shared_expert.gate=true gates a shared expert, but moe.shared_expert.mode=none: set "
                "moe.shared_expert.mode=copy or slices"] if shared.gate else []
    if moe.num_experts <= 0:
        return [f"moe.shared_expert.mode={shared.mode} needs an MoE (moe=e8t2, ...), not moe={moe.name}"]
    problems = []
    if shared.mode == "copy" and not 0.0 < shared.alpha < 1.0:
        problems.append(f"moe.shared_expert.alpha={shared.alpha} must be in (0, 1): the shared expert's share "
                        "of the FFN's output, the routed experts carrying the rest")
    if shared.mode == "slices":
        if moe.granularity < 2:
            problems.append(f"moe.shared_expert.mode=slices cuts the FFN into moe.granularity slices, "
                            f"moe.granularity={moe.granularity}: set moe.granularity>=2")
        elif not 1 <= shared.slices < moe.granularity:
            problems.append(f"moe.shared_expert.slices={shared.slices} must be between 1 and "
                            f"moe.granularity-1={moe.granularity - 1}, leaving slices for the routed experts")
    if problems or moe.granularity < 1 or cfg.model.ffn_hidden_size % moe.granularity:
        return problems
    width = counting_spec(cfg).shared_ffn_hidden_size
    if width % cfg.parallel.tp:
        problems.append(f"the shared expert's width {width} is not divisible by parallel.tp={cfg.parallel.tp} "
                        "(it is tensor-parallel like a dense FFN)")
    return problems


def token_dropping_problems(cfg: Any) -> list[str]:
    """Capacity factor, drop policy, padding and the dispatcher that does the dropping."""
    moe = cfg.moe
    problems = []
    if moe.capacity_factor is not None:
        if moe.capacity_factor <= 0:
            problems.append(f"moe.capacity_factor={moe.capacity_factor} must be > 0, or null for dropless")
        if moe.token_dispatcher == "allgather":
            problems.append(
                "moe.capacity_factor needs moe.token_dispatcher=alltoall "
                "(megatron-core drops tokens only in the alltoall dispatcher)"
            )
    if moe.drop_policy not in DROP_POLICIES:
        problems.append(f"moe.drop_policy={moe.drop_policy} must be one of {DROP_POLICIES}")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        problems.append("moe.pad_to_capacity=true needs a moe.capacity_factor")
    if moe.token_dispatcher not in ("alltoall", "allgather"):
        problems.append(f"moe.token_dispatcher={moe.token_dispatcher} must be alltoall or allgather")
    return problems


def layer_problems(cfg: Any) -> list[str]:
    try:
        moe_layer_indices(cfg.moe.layers, cfg.model.num_layers)
    except MoELayerSpecError as err:
        return [str(err)]
    return []


def initialisation_problems(cfg: Any) -> list[str]:
    """How the experts start: symmetry breaking and weight scaling."""
    moe = cfg.moe
    problems = []
    if not 0.0 <= moe.drop_upcycling_ratio <= 1.0:
        problems.append(f"moe.drop_upcycling_ratio={moe.drop_upcycling_ratio} must be in [0, 1]")
    if moe.weight_scaling not in ("auto", "none", "cube_root"):
        problems.append(f"moe.weight_scaling={moe.weight_scaling} must be auto, none or cube_root")
    return problems


def moe_problems(cfg: Any) -> list[str]:
    """Every ``moe.*`` problem of an MoE job (moe=dense has none to check but a shared expert asked for)."""
    if cfg.moe.num_experts <= 0:
        return shared_expert_problems(cfg)
    return (expert_problems(cfg) + shared_expert_problems(cfg) + token_dropping_problems(cfg)
            + layer_problems(cfg) + initialisation_problems(cfg))
