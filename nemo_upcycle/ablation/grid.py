"""The runs of an ablation grid: one per (router, capacity factor), plus the dense baseline and
one per extra moe preset (e.g. E8T2 with a shared expert)."""
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
    moe: Optional[str] = None  # the moe preset of a preset row; None: the grid's own moe (or dense)

    @property
    def label(self) -> str:
        if self.router is None:
            return "dense (continued training)"
        run = f"{self.router}, {capacity_label(self.capacity_factor)}"
        return run if self.moe is None else f"moe={self.moe}, {run}"


def capacity_label(capacity_factor: Optional[float]) -> str:
    return "dropless" if capacity_factor is None else f"CF {capacity_factor:g}"


def run_name(router: str, capacity_factor: Optional[float]) -> str:
    return f"{router}-{'dropless' if capacity_factor is None else f'cf{capacity_factor:g}'}"


def build_grid(ablate: Any) -> list[GridRun]:
    """Dense baseline first (the reference every MoE run is read against), then router-major,
    then the moe presets (each named after its preset)."""
    runs = []
    if ablate.dense_baseline:
        # The dense model has no experts: expert parallelism folds back into data parallelism.
        runs.append(GridRun("dense", None, None, ("moe=dense", "parallel.ep=1", "parallel.etp=null")))
    for router in ablate.routers:
        for cf in ablate.capacity_factors:
            cf = None if cf is None else float(cf)
            overrides = (f"router={router}", f"moe.capacity_factor={'null' if cf is None else cf}")
            runs.append(GridRun(run_name(router, cf), router, cf, overrides))
    if ablate.moe_presets and not ablate.routers:
        raise UserError(f"ablate.moe_presets={list(ablate.moe_presets)} run with the first of ablate.routers, "
                        f"which is empty: name one, e.g. ablate.routers=[topk_softmax]")
    for preset in ablate.moe_presets:
        # Dropless with the grid's first router: only the expert layout differs from that router's dropless row.
        router = ablate.routers[0]
        runs.append(GridRun(preset, router, None, (f"moe={preset}", f"router={router}", "moe.capacity_factor=null"),
                            moe=preset))
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"ablate.moe_presets={list(ablate.moe_presets)}: run name(s) {repeated} twice in the grid "
                        f"(a preset is named like another run); list each preset once, and not dense")
    if ablate.only:
        unknown = set(ablate.only) - set(names)
        if unknown:
            raise UserError(f"ablate.only names runs that are not in the grid: {sorted(unknown)}; "
                            f"the grid has {names}")
        runs = [r for r in runs if r.name in set(ablate.only)]
    return runs
