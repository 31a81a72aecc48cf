"""The parallel layout against the model and the launch: megatron-core's divisibility rules.

megatron-core checks most of these only once the model is built (or, for the world size,
once the process groups are made); here they are named before any weight is read.
"""
from __future__ import annotations

from typing import Any, Optional

from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel, model_parallel_size


def parallel_size_problems(par: Any) -> list[str]:
    """Every size must be at least 1: the other checks divide by them."""
    problems = [f"parallel.{name}={getattr(par, name)} must be >= 1"
                for name in ("tp", "pp", "ep", "cp") if getattr(par, name) < 1]
    if par.etp is not None and par.etp < 1:
        problems.append(f"parallel.etp={par.etp} must be >= 1 (or null for etp = tp)")
    if par.vpp is not None and par.vpp < 1:
        problems.append(f"parallel.vpp={par.vpp} must be >= 1 (or null)")
    return problems


def tensor_parallel_problems(cfg: Any) -> list[str]:
    model, tp = cfg.model, cfg.parallel.tp
    problems = []
    if model.num_attention_heads % tp:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
            f"parallel.tp={tp}; choose a tp that divides the number of heads"
        )
    if model.num_query_groups % tp:
        problems.append(
            f"model.num_query_groups={model.num_query_groups} is not divisible by "
            f"parallel.tp={tp}; megatron-core shards key/value heads across tp ranks"
        )
    if model.num_attention_heads % model.num_query_groups:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={model.num_query_groups}"
        )
    if model.vocab_size % tp:
        # megatron pads the vocabulary, but the dense checkpoint must then be padded too.
        problems.append(f"model.vocab_size={model.vocab_size} is not divisible by parallel.tp={tp}")
    return problems


def pipeline_problems(cfg: Any) -> list[str]:
    par, layers = cfg.parallel, cfg.model.num_layers
    stages = par.pp * (par.vpp or 1)
    problems = []
    if layers % stages:
        problems.append(
            f"model.num_layers={layers} is not divisible by parallel.pp*vpp = "
            f"{par.pp}*{par.vpp or 1} = {stages}; every pipeline stage needs the same number of layers"
        )
    if par.vpp is not None and par.vpp > 1 and par.pp < 2:
        problems.append(f"parallel.vpp={par.vpp} needs parallel.pp >= 2 (got pp={par.pp})")
    return problems


def sequence_parallel_problems(cfg: Any) -> list[str]:
    par = cfg.parallel
    problems = []
    if par.tp > 1 and cfg.moe.num_experts > 0 and not par.sp:
        problems.append(
            f"parallel.tp={par.tp} with MoE layers needs sequence parallelism: set parallel.sp=true"
        )
    if par.sp and par.tp == 1:
        problems.append("parallel.sp=true needs parallel.tp > 1")
    return problems


def dense_layout_problems(cfg: Any) -> list[str]:
    """Expert parallelism set for a model without experts is a mistake, not a no-op."""
    par = cfg.parallel
    if cfg.moe.num_experts > 0 or (par.ep == 1 and (par.etp is None or par.etp == par.tp)):
        return []
    return [f"parallel.ep={par.ep}/etp={par.etp} only apply to MoE models; "
            "moe=dense needs ep=1 and etp=null"]


def world_size_problems(cfg: Any, world_size: Optional[int]) -> list[str]:
    """The launched (or stated) number of ranks against the layout."""
    par = cfg.parallel
    expected = world_size if world_size is not None else par.world_size
    if expected is None:
        return []
    problems = []
    if par.world_size is not None and world_size is not None and par.world_size != world_size:
        problems.append(
            f"parallel.world_size={par.world_size} but the launcher started {world_size} "
            "ranks; fix --nproc_per_node/--nnodes or parallel.world_size"
        )
    model_parallel = model_parallel_size(par)
    if expected % model_parallel:
        problems.append(
            f"world size {expected} is not divisible by tp*pp*cp = "
            f"{par.tp}*{par.pp}*{par.cp} = {model_parallel}"
        )
    elif cfg.moe.num_experts > 0:
        etp = expert_tensor_parallel(par)
        expert_span = etp * par.ep * par.pp
        if expected % expert_span:
            problems.append(
                f"world size {expected} is not divisible by etp*ep*pp = "
                f"{etp}*{par.ep}*{par.pp} = {expert_span}; megatron-core folds expert "
                f"parallelism into the dp*cp*tp ranks (dp={expected // model_parallel})"
            )
    return problems
