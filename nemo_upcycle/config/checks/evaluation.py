"""The ``eval.*`` settings, checked with the rest so that a typo fails before any weight is read."""
from __future__ import annotations

from typing import Any

from nemo_upcycle.evaluation.config import SCORINGS


def evaluation_problems(cfg: Any) -> list[str]:
    scoring = cfg.eval.mmlu.scoring
    if scoring in SCORINGS:
        return []
    return [f"eval.mmlu.scoring={scoring} must be {' or '.join(SCORINGS)}"]
