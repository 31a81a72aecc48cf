"""The ``data.*`` settings that can be judged without reading the data (its tokens and the
epochs a run makes of them are checked by the training job's preflight: data/epochs.py)."""
from __future__ import annotations

from typing import Any


def data_problems(cfg: Any) -> list[str]:
    data = cfg.data
    problems = []
    if data.workers is not None and data.workers < 1:
        problems.append(f"data.workers={data.workers} must be >= 1 (null = one per CPU, at most 16)")
    if not str(data.text_field).strip():
        problems.append("data.text_field is empty: name the JSON field that holds each document's text")
    return problems
