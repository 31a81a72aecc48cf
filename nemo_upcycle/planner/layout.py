"""How the ranks of a job are arranged: world size, data-parallel sizes, pipeline stages.

Kept apart from the counting modules because every one of them needs the same answers
(which layers a pipeline stage owns, how many replicas share an optimizer shard), and
megatron-core's rules for them must be written down exactly once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel, model_parallel_size
from nemo_upcycle.config.validate import ConfigError
from nemo_upcycle.upcycle.spec import UpcycleSpec


def is_moe(cfg: Any) -> bool:
    # moe.num_experts alone: the world size is resolved before the config is validated.
    return cfg.moe.num_experts > 0


def moe_spec(cfg: Any) -> Optional[UpcycleSpec]:
    """The fine-grained counts (E·G experts of width F/G, top-T·G); None for moe=dense."""
    return UpcycleSpec.of(cfg) if is_moe(cfg) else None


def moe_layer_flags(cfg: Any) -> list[bool]:
    """True for each global layer that is upcycled to MoE (all False for moe=dense)."""
    spec = moe_spec(cfg)
    chosen = set(spec.moe_layers) if spec else set()
    return [i in chosen for i in range(Architecture.of(cfg.model).num_layers)]


def minimal_world_size(cfg: Any) -> int:
    """Smallest world size megatron-core accepts for this layout (dp = 1 where possible).

    Dense ranks span tp*pp*cp; expert ranks span etp*ep*pp; the world must be a multiple of both.
    """
    par = cfg.parallel
    dense_span = model_parallel_size(par)
    if not is_moe(cfg):
        return dense_span
    return math.lcm(dense_span, expert_tensor_parallel(par) * par.ep * par.pp)


def resolve_world_size(cfg: Any) -> tuple[int, str]:
    """(world size, where it came from): world_size=, nodes x gpus_per_node, parallel.world_size,
    or the smallest layout that runs."""
    explicit = getattr(cfg, "world_size", None)
    nodes = getattr(cfg, "nodes", None)
    per_node = getattr(cfg, "gpus_per_node", None)
    from_nodes: Optional[int] = None
    if nodes is not None or per_node is not None:
        if nodes is None or per_node is None:
            raise ConfigError(["give both nodes= and gpus_per_node= (or world_size=)"])
        from_nodes = nodes * per_node
    if explicit is not None and from_nodes is not None and explicit != from_nodes:
        raise ConfigError(
            [f"world_size={explicit} but nodes*gpus_per_node = {nodes}*{per_node} = {from_nodes}"]
        )
    if explicit is not None:
        return int(explicit), "world_size"
    if from_nodes is not None:
        return from_nodes, f"nodes*gpus_per_node = {nodes}*{per_node}"
    if cfg.parallel.world_size is not None:
        return int(cfg.parallel.world_size), "parallel.world_size"
    return minimal_world_size(cfg), "smallest world size for this layout"


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: int  # 1 without virtual pipeline
    cp: int
    ep: int
    etp: int
    sp: bool
    dp: int  # replicas of the dense parameters (megatron's data-parallel size)
    edp: int  # replicas of each expert shard (megatron's expert data-parallel size)

    @property
    def chunks(self) -> int:
        return self.pp * self.vpp


def layout_of(cfg: Any, world_size: int) -> Layout:
    par = cfg.parallel
    etp = expert_tensor_parallel(par) if is_moe(cfg) else par.tp
    ep = par.ep if is_moe(cfg) else 1
    return Layout(
        world_size=world_size,
        tp=par.tp,
        pp=par.pp,
        vpp=par.vpp or 1,
        cp=par.cp,
        ep=ep,
        etp=etp,
        sp=bool(par.sp),
        dp=world_size // model_parallel_size(par),
        # megatron-core: expert data parallel = world / (etp * ep * pp)
        edp=max(world_size // (etp * ep * par.pp), 1),
    )


def stage_layers(cfg: Any, pp_rank: int) -> list[list[int]]:
    """Global layer indices of each model chunk on pipeline rank ``pp_rank``.

    megatron-core (even split): chunk ``v`` of pipeline rank ``p`` holds layers
    ``v*L/vpp + p*L/(pp*vpp)`` onwards, ``L/(pp*vpp)`` of them.
    """
    par, L = cfg.parallel, Architecture.of(cfg.model).num_layers
    vpp = par.vpp or 1
    per_chunk = L // (par.pp * vpp)
    return [
        list(range(v * (L // vpp) + pp_rank * per_chunk, v * (L // vpp) + (pp_rank + 1) * per_chunk))
        for v in range(vpp)
    ]
