"""Configuration of ``python -m nemo_upcycle.ablate`` (the ``ablate`` key of the job config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AblateConfig:
    # Where each run gets its own log_dir (<out_dir>/<run name>) and the report is written.
    out_dir: str = "runs/ablation"
    # moe.capacity_factor values; null = dropless (the paper tried 1, 2, 4 and dropless).
    capacity_factors: list[Any] = field(default_factory=lambda: [None, 1.0, 2.0, 4.0])
    # router.type values (the rows of nemo_upcycle/upcycle/routers.py).
    routers: list[str] = field(default_factory=lambda: ["topk_softmax", "softmax_topk"])
    # Also run continued training of the dense model with the same data and tokens.
    dense_baseline: bool = True
    # One more run per moe preset (configs/moe/<name>.yaml) with the first of `routers`,
    # dropless: the same data and steps as the grid, another expert layout (default: E8T2 with
    # a shared expert beside the routed ones, read against the E8T2 rows).
    moe_presets: list[str] = field(default_factory=lambda: ["e8t2_shared"])
    # Ranks per run (torchrun --nproc_per_node).
    nproc: int = 2
    # Applied to every run before the command line's own overrides: the small CPU settings.
    # Every other FFN is upcycled (the paper converts "a subset" of layers): half the expert
    # memory and compute, so the 9 runs of dense + router x capacity factor on SmolLM2 fit in
    # an hour on 2 cores and ~8 GB.
    base_overrides: list[str] = field(default_factory=lambda: [
        "trainer=ablation", "parallel=ep2", "moe.layers=every_2",
        "eval.tasks=[mmlu,heldout_news]", "eval.limit=4",  # 4 questions per MMLU subject (228), 4 news articles
    ])
    # A run taking longer than this is killed and reported as failed.
    run_timeout_s: float = 3600.0
    # Also copy the report files here (e.g. benchmarks/results/ablation) ...
    publish_dir: Optional[str] = None
    # ... and rewrite the results block of this README (e.g. README.md) with the table and plots.
    readme: Optional[str] = None
    # Only these run names (e.g. [dense, topk_softmax-cf4, e8t2_shared]); null = the whole grid.
    only: Optional[list[str]] = None
