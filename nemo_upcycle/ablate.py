"""nemo-upcycle ablate [ablate.*=...] [any training override]

The paper's ablation (capacity factor x routing algorithm, plus continued dense training
and one run per ``ablate.moe_presets`` entry, by default E8T2 beside a shared expert) as a
grid of short upcycle-and-train runs from the same dense checkpoint, on the same data and
tokens. Each run trains with ``python -m nemo_upcycle.train`` under torchrun and is
evaluated right after its last step (held-out perplexity, MMLU 0-shot). Then it writes
``<ablate.out_dir>/results.{json,csv,md}``, ``loss_curves.png`` and ``eval_bars.png``.

Relaunching the same command skips the runs that finished. Every override that is not
``ablate.*`` applies to every run (e.g. ``trainer.max_steps=30``); ``ablate.base_overrides``
holds the small CPU defaults, applied first. Every run's configuration is checked before
the first run starts.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nemo_upcycle.cli.common import CONFIG_DIR, fail, user_errors
from nemo_upcycle.config.schema import register_configs

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_upcycle.ablation.checks import check_runs
    from nemo_upcycle.ablation.grid import build_grid
    from nemo_upcycle.ablation.publish import publish, report_header
    from nemo_upcycle.ablation.report import markdown_table, write_report
    from nemo_upcycle.ablation.runner import run_grid

    # SIGTERM (Slurm's scancel, kill) unwinds like Ctrl-C, so the running job is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ablate = cfg.ablate
    common = [*ablate.base_overrides, *(o for o in HydraConfig.get().overrides.task if not o.startswith("ablate."))]
    with user_errors():
        runs = build_grid(ablate)
        max_steps = check_runs(runs, common, ablate)
    print(f"ablation grid: {len(runs)} runs into {ablate.out_dir}: {', '.join(r.name for r in runs)}", flush=True)
    outcomes = run_grid(runs, common, ablate, max_steps)
    results = [o.result for o in outcomes if o.result is not None]
    if results:
        paths = write_report(results, Path(ablate.out_dir), report_header(ablate, common, results))
        print(markdown_table(results), flush=True)
        print("report: " + ", ".join(str(p) for p in paths.values()), flush=True)
        if ablate.publish_dir:
            with user_errors():
                publish(paths, ablate)
    failed = [o for o in outcomes if o.result is None]
    for outcome in failed:
        print(f"failed: {outcome.run.name}: {outcome.error} (relaunch the same command to retry it)", file=sys.stderr)
    if failed:
        fail(1)


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
