"""Every run of the grid composed and validated before the first one starts."""
from __future__ import annotations

from pathlib import Path


def check_runs(runs, common: list[str], ablate) -> dict[str, int]:
    """Compose and validate every run's configuration; return each run's max_steps.

    Raises ConfigError listing the problems of all runs, before any run starts.
    """
    from hydra.errors import HydraException

    from nemo_upcycle.ablation.runner import run_overrides
    from nemo_upcycle.checkpoint.sources.dense_source import resolve_dense_model
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.config.validate import ConfigError, collect_problems
    from nemo_upcycle.errors import UserError
    from nemo_upcycle.evaluation.tasks import HELDOUT_TASK

    problems, max_steps = [], {}
    if ablate.nproc < 1:
        problems.append(f"ablate.nproc={ablate.nproc} must be >= 1")
    for run in runs:
        overrides = run_overrides(run, common, Path(ablate.out_dir) / run.name)
        try:
            cfg = compose_config(overrides)
        except HydraException as err:
            problems.append(f"run {run.name}: {err}")
            continue
        try:
            resolve_dense_model(cfg)  # model=auto: the architecture from the checkpoint
        except UserError as err:
            problems.append(f"run {run.name}: {err}")
            continue
        problems += [f"run {run.name}: {p}" for p in collect_problems(cfg, ablate.nproc)]
        tasks = list(cfg.eval.tasks)
        if HELDOUT_TASK not in tasks or not any(t.startswith("mmlu") for t in tasks):
            problems.append(f"run {run.name}: eval.tasks={tasks}: the grid's report needs held-out perplexity and MMLU, "
                            f"e.g. eval.tasks=[mmlu,{HELDOUT_TASK}]")
        max_steps[run.name] = cfg.trainer.max_steps
    if problems:
        raise ConfigError(problems)
    return max_steps
