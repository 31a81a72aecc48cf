"""The ``data.*`` settings that can be judged without reading the data (its tokens and the
epochs a run makes of them are checked by the training job's preflight: data/epochs.py)."""
from __future__ import annotations

from typing import Any


def data_problems(cfg: Any) -> list[str]:
    from nemo_upcycle.data.epochs import train_fraction

    data = cfg.data
    problems = []
    if data.workers is not None and data.workers < 1:
        problems.append(f"data.workers={data.workers} must be >= 1 (null = one per CPU, at most 16)")
    try:
        if train_fraction(data.split) <= 0:
            problems.append(f"data.split={data.split} gives training no share of the data: its first number is "
                            "the training weight (e.g. 98,2,0)")
    except ValueError:
        problems.append(f"data.split={data.split} must be the train,validation,test weights (e.g. 98,2,0)")
    if not str(data.text_field).strip():
        problems.append("data.text_field is empty: name the JSON field that holds each document's text")
    return problems
