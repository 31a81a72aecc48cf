"""How many times a run reads its data: stated at start-up, refused above a few epochs.

A run trains on ``max_steps x global_batch_size x seq_length`` tokens; its data holds what
the ``.idx`` files count. Repeating a corpus a few times costs little (Muennighoff et al.,
*Scaling Data-Constrained Language Models*, NeurIPS 2023: up to about 4 epochs, repeated
tokens are worth almost as much as new ones; beyond that their value falls off quickly and
the model memorises). So a run that would read its data more than :data:`MAX_EPOCHS` times
is almost always a run pointed at the wrong data (the paper's 100B-token recipe on the
demo's Wikipedia sample) and is refused before any weight is read, unless
``data.allow_repeats=true``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_upcycle.data.prepare import EMBEDDED_DATA, DataError, blend_prefixes, blend_weights

MAX_EPOCHS = 4.0


@dataclass(frozen=True)
class DataBudget:
    prefixes: list[str]
    tokens: list[int]          # in each prefix
    shares: list[float]        # each prefix's share of the training samples
    train_fraction: float      # of each dataset's tokens in the training split (data.split)
    max_steps: int
    global_batch_size: int
    seq_length: int

    @property
    def trained_tokens(self) -> int:
        return self.max_steps * self.global_batch_size * self.seq_length

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    def epochs(self) -> list[float]:
        """Passes over each dataset's training split this run makes."""
        return [share * self.trained_tokens / max(1.0, self.train_fraction * tokens)
                for share, tokens in zip(self.shares, self.tokens)]

    @property
    def max_epochs(self) -> float:
        return max(self.epochs())

    def steps_within(self, epochs: float) -> int:
        """The largest max_steps that stays within ``epochs`` passes over every dataset."""
        return int(self.max_steps * epochs / self.max_epochs)


def train_fraction(split: str) -> float:
    """The training share of ``data.split`` ("98,2,0" -> 0.98), as megatron normalises it."""
    parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    return parts[0] / sum(parts) if parts and sum(parts) > 0 else 1.0


def data_budget(cfg: Any, paths: list) -> DataBudget:
    """Tokens in the resolved blend ``paths`` and what this run's trainer settings take from them."""
    from nemo_upcycle.data.indexed import dataset_tokens

    prefixes = blend_prefixes(paths)
    tokens = [dataset_tokens(p) for p in prefixes]
    # Unweighted, megatron blends whole datasets by size: each is read the same number of times.
    shares = blend_weights(paths) or [t / max(1, sum(tokens)) for t in tokens]
    tr = cfg.trainer
    return DataBudget(prefixes, tokens, shares, train_fraction(cfg.data.split), tr.max_steps,
                      tr.global_batch_size, tr.seq_length)


def data_name(cfg: Any) -> str:
    """The ``data.*`` setting a message names."""
    if cfg.data.jsonl:
        return f"data.jsonl={cfg.data.jsonl}"
    if cfg.data.paths == EMBEDDED_DATA:
        return f"data.paths={EMBEDDED_DATA} (gensim's Wikipedia sample, the demo's data)"
    return f"data.paths={cfg.data.paths}"


def describe(cfg: Any, budget: DataBudget) -> str:
    """The start-up line: tokens in the data, tokens this run trains on, and the epochs."""
    per_dataset = ""
    if len(budget.prefixes) > 1:
        per_dataset = " (" + ", ".join(f"{e:.2f} of {p}" for p, e in zip(budget.prefixes, budget.epochs())) + ")"
    return (f"data: {budget.total_tokens:,} tokens in {data_name(cfg)}, {budget.train_fraction:.0%} for training "
            f"(data.split={cfg.data.split}); trainer: {budget.max_steps} steps x {budget.global_batch_size} "
            f"sequences x {budget.seq_length} tokens = {budget.trained_tokens:,} tokens: "
            f"{budget.max_epochs:.2f} epochs{per_dataset}")


def check_repeats(cfg: Any, budget: DataBudget) -> None:
    """Refuse a run that reads its data more than :data:`MAX_EPOCHS` times (unless ``data.allow_repeats``)."""
    if budget.max_epochs <= MAX_EPOCHS or cfg.data.allow_repeats:
        return
    needed = int(budget.trained_tokens / MAX_EPOCHS / budget.train_fraction)
    raise DataError(
        f"this run would read its data {budget.max_epochs:,.1f} times: trainer.max_steps={budget.max_steps} x "
        f"global_batch_size={budget.global_batch_size} x seq_length={budget.seq_length} = "
        f"{budget.trained_tokens:,} tokens, and {data_name(cfg)} holds {budget.total_tokens:,} tokens "
        f"({budget.train_fraction:.0%} for training). Above {MAX_EPOCHS:g} epochs repeated tokens are worth "
        f"little (Muennighoff et al. 2023), so this run needs at least {needed:,} tokens of data: point "
        "data.paths at your corpus's .bin/.idx prefixes (`nemo-upcycle prepare_data` writes them from JSONL) or "
        f"data.jsonl at its JSONL files, lower trainer.max_steps to {budget.steps_within(MAX_EPOCHS)} or fewer, "
        "or set data.allow_repeats=true to train on it anyway"
    )
