"""Semantic checks of a composed job configuration.

Hydra's schemas catch typos and wrong types; these checks catch combinations that
megatron-core would reject late (or, worse, accept and compute something else). They run
before any weight is read or any file is written, and report every problem at once, each
naming the offending values and the fix.
"""
from __future__ import annotations

from typing import Any, Optional

from nemo_upcycle.config.moe_layers import MoELayerSpecError, moe_layer_indices
from nemo_upcycle.errors import UserError
from nemo_upcycle.upcycle.routers import ROUTER_TYPES

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
DROP_POLICIES = ("probs", "position")


class ConfigError(UserError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def data_parallel_size(parallel: Any, world_size: int) -> int:
    """Data-parallel size implied by a world size; raises if the layout does not divide it."""
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise ConfigError(
            [
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{parallel.tp}*{parallel.pp}*{parallel.cp} = {model_parallel}; "
                "launch a multiple of that many ranks or change parallel.*"
            ]
        )
    return world_size // model_parallel


def expert_tensor_parallel(parallel: Any) -> int:
    return parallel.tp if parallel.etp is None else parallel.etp


def collect_problems(cfg: Any, world_size: Optional[int] = None) -> list[str]:
    """Every problem with ``cfg`` (an OmegaConf node or the dataclass), as sentences."""
    problems: list[str] = []
    model, moe, router, par = cfg.model, cfg.moe, cfg.router, cfg.parallel
    is_moe = moe.num_experts > 0

    for name in ("tp", "pp", "ep", "cp"):
        if getattr(par, name) < 1:
            problems.append(f"parallel.{name}={getattr(par, name)} must be >= 1")
    if par.etp is not None and par.etp < 1:
        problems.append(f"parallel.etp={par.etp} must be >= 1 (or null for etp = tp)")
    if par.vpp is not None and par.vpp < 1:
        problems.append(f"parallel.vpp={par.vpp} must be >= 1 (or null)")
    if problems:
        return problems

    if model.num_attention_heads % par.tp:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
            f"parallel.tp={par.tp}; choose a tp that divides the number of heads"
        )
    if model.num_query_groups % par.tp:
        problems.append(
            f"model.num_query_groups={model.num_query_groups} is not divisible by "
            f"parallel.tp={par.tp}; megatron-core shards key/value heads across tp ranks"
        )
    if model.num_attention_heads % model.num_query_groups:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={model.num_query_groups}"
        )
    stages = par.pp * (par.vpp or 1)
    if model.num_layers % stages:
        problems.append(
            f"model.num_layers={model.num_layers} is not divisible by parallel.pp*vpp = "
            f"{par.pp}*{par.vpp or 1} = {stages}; every pipeline stage needs the same number of layers"
        )
    if par.vpp is not None and par.vpp > 1 and par.pp < 2:
        problems.append(f"parallel.vpp={par.vpp} needs parallel.pp >= 2 (got pp={par.pp})")
    if model.vocab_size % par.tp:
        # megatron pads the vocabulary, but the dense checkpoint must then be padded too.
        problems.append(
            f"model.vocab_size={model.vocab_size} is not divisible by parallel.tp={par.tp}"
        )
    if par.tp > 1 and is_moe and not par.sp:
        problems.append(
            f"parallel.tp={par.tp} with MoE layers needs sequence parallelism: set parallel.sp=true"
        )
    if par.sp and par.tp == 1:
        problems.append("parallel.sp=true needs parallel.tp > 1")

    if is_moe:
        n_experts = moe.num_experts * moe.granularity
        if moe.topk < 1 or moe.topk > moe.num_experts:
            problems.append(
                f"moe.topk={moe.topk} must be between 1 and moe.num_experts={moe.num_experts}"
            )
        if moe.granularity < 1:
            problems.append(f"moe.granularity={moe.granularity} must be >= 1")
        elif model.ffn_hidden_size % moe.granularity:
            problems.append(
                f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by "
                f"moe.granularity={moe.granularity}; each granular expert takes an equal slice"
            )
        if n_experts % par.ep:
            problems.append(
                f"moe.num_experts={moe.num_experts} (x granularity {moe.granularity} = "
                f"{n_experts} experts) is not divisible by parallel.ep={par.ep}; "
                "pick an ep that divides the number of experts"
            )
        etp = expert_tensor_parallel(par)
        if moe.granularity >= 1 and (model.ffn_hidden_size // moe.granularity) % etp:
            problems.append(
                f"expert FFN width {model.ffn_hidden_size // max(moe.granularity, 1)} is not "
                f"divisible by the expert tensor-parallel size {etp} (parallel.etp)"
            )
        if moe.capacity_factor is not None:
            if moe.capacity_factor <= 0:
                problems.append(
                    f"moe.capacity_factor={moe.capacity_factor} must be > 0, or null for dropless"
                )
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
            problems.append(
                f"moe.token_dispatcher={moe.token_dispatcher} must be alltoall or allgather"
            )
        try:
            moe_layer_indices(moe.layers, model.num_layers)
        except MoELayerSpecError as err:
            problems.append(str(err))
        if not 0.0 <= moe.drop_upcycling_ratio <= 1.0:
            problems.append(
                f"moe.drop_upcycling_ratio={moe.drop_upcycling_ratio} must be in [0, 1]"
            )
        if moe.weight_scaling not in ("auto", "none", "cube_root"):
            problems.append(
                f"moe.weight_scaling={moe.weight_scaling} must be auto, none or cube_root"
            )

        if router.type not in ROUTER_TYPES:
            problems.append(f"router.type={router.type} must be one of {ROUTER_TYPES}")
        if router.load_balancing not in LOAD_BALANCING:
            problems.append(
                f"router.load_balancing={router.load_balancing} must be one of {LOAD_BALANCING}"
            )
        if router.type == "sinkhorn":
            if router.load_balancing != "sinkhorn":
                problems.append(
                    "router.type=sinkhorn needs router.load_balancing=sinkhorn "
                    f"(got {router.load_balancing})"
                )
            if router.aux_loss_coeff:
                problems.append(
                    f"router.type=sinkhorn balances by construction: set router.aux_loss_coeff=0 "
                    f"(got {router.aux_loss_coeff})"
                )
        elif router.load_balancing == "sinkhorn":
            problems.append(
                f"router.load_balancing=sinkhorn is only valid with router.type=sinkhorn "
                f"(got router.type={router.type})"
            )
        if router.type == "aux_free" and router.load_balancing != "none":
            problems.append(
                "router.type=aux_free balances with an expert bias: set router.load_balancing=none"
            )
        if router.init_std < 0:
            problems.append(f"router.init_std={router.init_std} must be >= 0")
        # Both rejected by megatron-core's TransformerConfig, only once the model is built.
        if moe.capacity_factor is not None and router.load_balancing == "sinkhorn":
            problems.append(
                f"moe.capacity_factor={moe.capacity_factor} does not work with router.load_balancing="
                "sinkhorn (megatron-core drops tokens only with aux_loss, seq_aux_loss, global_aux_loss "
                "or none); sinkhorn balances by construction: set moe.capacity_factor=null"
            )
        if router.type == "topk_softmax" and moe.topk * moe.granularity == 1:
            problems.append(
                "moe.topk=1 with router.type=topk_softmax: a softmax over the one chosen expert is "
                "always 1, so the router would get no gradient (megatron-core refuses it); use "
                "router=softmax_topk, sinkhorn or aux_free"
            )
    elif par.ep > 1 or (par.etp is not None and par.etp != par.tp):
        problems.append(
            f"parallel.ep={par.ep}/etp={par.etp} only apply to MoE models; "
            "moe=dense needs ep=1 and etp=null"
        )

    if cfg.trainer.checkpoint_every_n_steps < 0:
        problems.append(f"trainer.checkpoint_every_n_steps={cfg.trainer.checkpoint_every_n_steps} "
                        "must be >= 0 (0 = save no checkpoint)")

    problems += guard_problems(cfg)

    expected = world_size if world_size is not None else par.world_size
    if expected is not None:
        if par.world_size is not None and world_size is not None and par.world_size != world_size:
            problems.append(
                f"parallel.world_size={par.world_size} but the launcher started {world_size} "
                "ranks; fix --nproc_per_node/--nnodes or parallel.world_size"
            )
        model_parallel = par.tp * par.pp * par.cp
        if expected % model_parallel:
            problems.append(
                f"world size {expected} is not divisible by tp*pp*cp = "
                f"{par.tp}*{par.pp}*{par.cp} = {model_parallel}"
            )
        elif is_moe:
            dp = expected // model_parallel
            etp = expert_tensor_parallel(par)
            expert_span = etp * par.ep * par.pp
            if expected % expert_span:
                problems.append(
                    f"world size {expected} is not divisible by etp*ep*pp = "
                    f"{etp}*{par.ep}*{par.pp} = {expert_span}; megatron-core folds expert "
                    f"parallelism into the dp*cp*tp ranks (dp={dp})"
                )
    return problems


def guard_problems(cfg: Any) -> list[str]:
    """The optional router-collapse thresholds (nemo_upcycle/training/guards.py) must be able
    to fire at all, and must not fire on every step."""
    tr, moe = cfg.trainer, cfg.moe
    dropped, load = tr.guard_max_dropped_fraction, tr.guard_max_load_ratio
    if dropped is None and load is None:
        return []
    if moe.num_experts == 0:
        return ["trainer.guard_max_dropped_fraction / guard_max_load_ratio watch the routers, and "
                "moe=dense has none: set them to null"]
    problems = []
    if dropped is not None:
        if not 0.0 <= dropped < 1.0:
            problems.append(f"trainer.guard_max_dropped_fraction={dropped} must be in [0, 1) (null = off)")
        elif moe.capacity_factor is None:
            problems.append(
                f"trainer.guard_max_dropped_fraction={dropped} can never fire: moe.capacity_factor=null "
                "is dropless; set a capacity factor or the guard to null"
            )
    if load is not None:
        # Each token picks top-k distinct experts, so the busiest expert gets at most 1/k of
        # the assignments: E/k times its fair share.
        ceiling = moe.num_experts / moe.topk if moe.topk else float("inf")
        if not 1.0 <= load < ceiling:
            problems.append(
                f"trainer.guard_max_load_ratio={load} must be >= 1 (1 = perfectly balanced) and below "
                f"moe.num_experts/moe.topk = {ceiling:g}, the most the busiest expert can get (null = off)"
            )
    return problems


def validate(cfg: Any, world_size: Optional[int] = None) -> None:
    """Raise :class:`ConfigError` listing every problem with ``cfg``."""
    problems = collect_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
