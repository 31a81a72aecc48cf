"""Every parallel layout of a world size, and which of them the validation accepts for a job.

The candidates are all combinations of sizes that could tile ``world_size`` ranks (each of
tp, pp, cp, ep, etp a divisor of it, sequence parallelism on or off, virtual pipeline stages
up to ``max_vpp``); whether one suits the model, the experts and the command is decided by
:func:`nemo_upcycle.config.validate.collect_problems`, never here, so this list cannot drift
from what the commands accept. The layout tests walk it; the planner can offer it.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass
from typing import Any, Optional

from omegaconf import OmegaConf


@dataclass(frozen=True)
class CandidateLayout:
    """One ``parallel.*`` setting. ``etp`` is always explicit: null means etp = tp, the same layout."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    etp: int = 1
    sp: bool = False
    cp: int = 1

    def overrides(self) -> list[str]:
        """The Hydra overrides that select this layout."""
        return [f"parallel.{k}={'null' if v is None else str(v).lower()}" for k, v in asdict(self).items()]

    def name(self) -> str:
        """A short label, e.g. ``tp2_sp_ep2_etp1``: only the sizes that are not 1."""
        parts = [f"{k}{v}" for k, v in asdict(self).items() if k != "sp" and v not in (None, 1)]
        if self.sp:
            parts.insert(1 if self.tp > 1 else 0, "sp")
        return "_".join(parts) or "dp_only"

    def sort_key(self) -> tuple:
        return (self.tp, self.pp, self.vpp or 1, self.ep, self.etp, self.sp, self.cp)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(world_size: int, max_vpp: int = 2) -> list[CandidateLayout]:
    """Every combination of divisors of ``world_size`` (and vpp up to ``max_vpp``), sorted.

    Nothing is filtered here, not even the rank grids megatron-core cannot build (tp*pp*cp or
    etp*ep*pp not dividing the world size): that is the validation's job. vpp=1 is left out
    (the same as none).
    """
    sizes = divisors(world_size)
    vpps = [None, *range(2, max_vpp + 1)]
    layouts = [CandidateLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sp=sp, cp=cp)
               for tp, pp, cp, ep, etp, vpp, sp in itertools.product(sizes, sizes, sizes, sizes, sizes, vpps,
                                                                    (False, True))]
    return sorted(layouts, key=CandidateLayout.sort_key)


def with_layout(job: Any, layout: CandidateLayout) -> Any:
    """``job`` (the configuration as its dataclass) with ``parallel.*`` replaced by ``layout``."""
    return dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, **asdict(layout)))


def sort_layouts(cfg: Any, world_size: int, command: str = "verify",
                 max_vpp: int = 2) -> tuple[list[CandidateLayout], dict[CandidateLayout, list[str]]]:
    """The candidate layouts of ``world_size`` that ``cfg``'s job accepts for ``command``, and
    every refused one with the validation's problems."""
    from nemo_upcycle.config.validate import collect_problems

    # As dataclasses: copying a composed OmegaConf tree per candidate costs ~10 ms, a thousand times.
    job = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    accepted, refused = [], {}
    for layout in candidate_layouts(world_size, max_vpp):
        problems = collect_problems(with_layout(job, layout), world_size, command)
        if problems:
            refused[layout] = problems
        else:
            accepted.append(layout)
    return accepted, refused
