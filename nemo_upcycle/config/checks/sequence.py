"""Sequence lengths and context parallelism against the layout, per command.

Each command reads a different length: training ``trainer.seq_length`` (and the planner
plans that run), verify ``verify.seq_length`` (rounded down to a multiple the layout allows
in nemo_upcycle.upcycle.step0_check: its default is one number for every layout), evaluate pads
its batches up to a multiple itself (nemo_upcycle.evaluation.backends). Failing here
costs nothing; megatron-core fails in the first forward pass, after every weight was read.
"""
from __future__ import annotations

from typing import Any

from nemo_upcycle.config.parallel_sizes import sequence_multiple

# The commands that run the model on this machine (the planner only computes).
RUNS_HERE = ("train", "verify", "evaluate")


def why_multiple(par: Any) -> str:
    """Why the layout needs lengths that are multiples of :func:`sequence_multiple`."""
    reasons = []
    if par.sp:
        reasons.append(f"sequence parallelism splits the sequence over parallel.tp={par.tp} ranks")
    if par.cp > 1:
        reasons.append(f"context parallelism cuts the sequence into 2*parallel.cp={2 * par.cp} chunks")
    return " and ".join(reasons)


def sequence_length_problems(cfg: Any, command: str = "train") -> list[str]:
    par = cfg.parallel
    multiple = sequence_multiple(par)
    if multiple == 1:
        return []
    if command in ("train", "plan"):
        length = cfg.trainer.seq_length
        if length % multiple:
            lower = length - length % multiple
            return [f"trainer.seq_length={length} must be a multiple of {multiple} ({why_multiple(par)}): "
                    f"use {lower or multiple} or {lower + multiple}"]
    if command == "verify" and cfg.verify.seq_length < multiple:
        return [f"verify.seq_length={cfg.verify.seq_length} is shorter than {multiple}, the least the "
                f"layout allows ({why_multiple(par)}): set verify.seq_length >= {multiple}"]
    return []


def context_parallel_problems(cfg: Any, command: str = "train") -> list[str]:
    """megatron-core runs context parallelism only in Transformer Engine's attention, and the
    step-0 check and the evaluation feed whole sequences to every rank."""
    cp = cfg.parallel.cp
    if cp == 1 or command not in RUNS_HERE:
        return []
    if command in ("verify", "evaluate"):
        return [f"parallel.cp={cp}: {command} runs whole sequences on every rank; use parallel.cp=1 "
                "(the same model and weights, so the check and the scores hold for the cp run)"]
    problems = []
    if cfg.eval.after_training:
        problems.append(f"eval.after_training=true runs whole sequences on every rank and parallel.cp={cp} "
                        "splits them: evaluate the checkpoint with parallel.cp=1 instead")
    from nemo_upcycle.model.fused_paths import transformer_engine_available

    if transformer_engine_available():
        return problems
    return problems + [f"parallel.cp={cp} needs Transformer Engine (megatron-core: \"Context parallelism is only "
            "supported by TEDotProductAttention\"), and it is not usable here (no GPU, or "
            "transformer_engine not importable): set parallel.cp=1"]
