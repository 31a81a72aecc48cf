"""The ``eval.*`` settings, checked with the rest so that a typo fails before any weight is read."""
from __future__ import annotations

from typing import Any

from nemo_upcycle.evaluation.tasks import MMLU_DEV_SHOTS, check_task_names


def evaluation_problems(cfg: Any) -> list[str]:
    e = cfg.eval
    problems = check_task_names(list(e.tasks))
    if not e.tasks:
        problems.append("eval.tasks is empty: name at least one task, e.g. eval.tasks=[mmlu]")
    if e.num_fewshot is not None and not 0 <= e.num_fewshot <= MMLU_DEV_SHOTS and any(
            t.startswith("mmlu") for t in e.tasks):
        problems.append(f"eval.num_fewshot={e.num_fewshot}: MMLU's dev split holds {MMLU_DEV_SHOTS} examples per "
                        f"subject; use 0..{MMLU_DEV_SHOTS}")
    elif e.num_fewshot is not None and e.num_fewshot < 0:
        problems.append(f"eval.num_fewshot={e.num_fewshot} must be >= 0 (or null: each task's own)")
    if e.limit is not None and e.limit <= 0:
        problems.append(f"eval.limit={e.limit:g} must be > 0 (documents per task, or a fraction below 1) or null")
    if e.batch_size < 1:
        problems.append(f"eval.batch_size={e.batch_size} must be >= 1")
    return problems
