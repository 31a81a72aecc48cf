"""The runs of an ablation grid: one per (router, capacity factor), plus the dense baseline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from nemo_upcycle.errors import UserError


@dataclass(frozen=True)
class GridRun:
    name: str
    router: Optional[str]  # None for the dense baseline
    capacity_factor: Optional[float]  # None = dropless
    overrides: tuple[str, ...]  # what makes this run differ from the others

    @property
    def label(self) -> str:
        if self.router is None:
            return "dense (continued training)"
        return f"{self.router}, {capacity_label(self.capacity_factor)}"


def capacity_label(capacity_factor: Optional[float]) -> str:
    return "dropless" if capacity_factor is None else f"CF {capacity_factor:g}"


def run_name(router: str, capacity_factor: Optional[float]) -> str:
    return f"{router}-{'dropless' if capacity_factor is None else f'cf{capacity_factor:g}'}"


def build_grid(ablate: Any) -> list[GridRun]:
    """Dense baseline first (the reference every MoE run is read against), then router-major."""
    runs = []
    if ablate.dense_baseline:
        # The dense model has no experts: expert parallelism folds back into data parallelism.
        runs.append(GridRun("dense", None, None, ("moe=dense", "parallel.ep=1", "parallel.etp=null")))
    for router in ablate.routers:
        for cf in ablate.capacity_factors:
            cf = None if cf is None else float(cf)
            overrides = (f"router={router}", f"moe.capacity_factor={'null' if cf is None else cf}")
            runs.append(GridRun(run_name(router, cf), router, cf, overrides))
    if ablate.only:
        unknown = set(ablate.only) - {r.name for r in runs}
        if unknown:
            raise UserError(f"ablate.only names runs that are not in the grid: {sorted(unknown)}; "
                            f"the grid has {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in set(ablate.only)]
    return runs
