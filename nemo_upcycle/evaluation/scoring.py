"""Batched log-likelihood scoring on any back end.

A back end answers one question: for a batch of token sequences, the log-probability
(log-softmax over the whole vocabulary) of some token ids at some positions. Everything
else (continuation log-likelihoods for MMLU, perplexity windows, batching, padding,
truncation) is built on that here, once, so the megatron-core and the transformers back ends
give the same numbers for the same model.

Batches are right-padded: with causal attention a real token never sees a padding token, so
the positions that are read are exact whatever the padding.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

LOG_SOFTMAX_ROWS = 512


class Backend(Protocol):
    # Longest sequence the model takes (its position embeddings).
    max_length: int

    def selected_logprobs(
        self, sequences: Sequence[Sequence[int]], rows: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """``out[n, k] = log p(token_ids[n, k] | sequences[rows[n, 0]][: rows[n, 1] + 1])``.

        ``rows``: (N, 2) long (sequence index, position); ``token_ids``: (N, K) long;
        returns (N, K) float64, the same on every rank.
        """
        ...


def pick_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[n, token_ids[n, k]] as float64, in slices to bound memory, on the
    logits' device."""
    token_ids = token_ids.to(logits.device)
    out = torch.empty(token_ids.shape, dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], LOG_SOFTMAX_ROWS):
        stop = start + LOG_SOFTMAX_ROWS
        block = torch.log_softmax(logits[start:stop].float(), dim=-1)
        out[start:stop] = block.gather(1, token_ids[start:stop]).double()
    return out


def pad_right(sequences: Sequence[Sequence[int]], multiple: int = 1, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention mask), right-padded to the longest sequence (rounded up to ``multiple``)."""
    longest = max(len(s) for s in sequences)
    length = -(-longest // multiple) * multiple
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return tokens, mask


@dataclass
class _Item:
    """One sequence to run and what to read from it."""

    tokens: list[int]
    positions: list[int]
    token_ids: list[list[int]]  # per position, the ids whose log-probs are wanted
    owner: tuple  # where the values go


class Progress:
    """Occasional progress lines on stderr (rank 0 only), for long CPU runs."""

    def __init__(self, label: str, total: int, enabled: bool, every_s: float = 30.0):
        self.label, self.total, self.enabled, self.every_s = label, total, enabled, every_s
        self.started = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[{self.label}] {self.done}/{self.total} sequences, {now - self.started:.0f}s, "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)


def _run_items(backend: Backend, items: list[_Item], batch_size: int, progress: Optional[Progress]) -> list[list[list[float]]]:
    """Values per item (per position, per token id). Items are batched longest first."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].tokens), i))
    values: list = [None] * len(items)
    for start in range(0, len(order), batch_size):
        batch = [items[i] for i in order[start:start + batch_size]]
        k = max(len(ids) for item in batch for ids in item.token_ids)
        rows, ids = [], []
        for b, item in enumerate(batch):
            for pos, wanted in zip(item.positions, item.token_ids):
                rows.append((b, pos))
                ids.append(list(wanted) + [0] * (k - len(wanted)))
        out = backend.selected_logprobs(
            [item.tokens for item in batch],
            torch.tensor(rows, dtype=torch.long).view(-1, 2),
            torch.tensor(ids, dtype=torch.long).view(-1, k),
        )
        cursor = 0
        for index, item in zip(order[start:start + batch_size], batch):
            per_pos = []
            for wanted in item.token_ids:
                per_pos.append(out[cursor, : len(wanted)].tolist())
                cursor += 1
            values[index] = per_pos
        if progress is not None:
            progress.update(len(batch))
    return values


def continuation_items(
    contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], max_length: int
) -> list[_Item]:
    """Sequences whose read-outs give log p(continuation | context) for every choice.

    When every choice of a request is a single token (letters), one sequence (the context)
    is enough: the choices are read at its last position. Otherwise each choice runs as
    context + continuation (without its last token, which is only predicted). Contexts
    that do not fit ``max_length`` lose their oldest tokens (at least one is kept).
    """
    items = []
    for r, (ctx, conts) in enumerate(zip(contexts, continuations)):
        if any(len(c) == 0 for c in conts):
            raise ValueError(f"request {r}: an empty continuation cannot be scored")
        if not ctx:
            raise ValueError(f"request {r}: an empty context cannot be scored")
        if all(len(c) == 1 for c in conts):
            tokens = list(ctx)[-max_length:]
            items.append(_Item(tokens, [len(tokens) - 1], [[c[0] for c in conts]], (r, None)))
            continue
        for j, cont in enumerate(conts):
            # An answer longer than the model's positions (tiny byte-level models) is scored
            # on its first max_length tokens, after one context token.
            cont = list(cont)[:max_length]
            keep = max_length - len(cont) + 1
            ctx_j = list(ctx)[-keep:]
            tokens = (ctx_j + cont)[:-1]
            positions = list(range(len(ctx_j) - 1, len(ctx_j) - 1 + len(cont)))
            items.append(_Item(tokens, positions, [[t] for t in cont], (r, j)))
    return items


def score_continuations(
    backend: Backend,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 8,
    progress: Optional[Progress] = None,
) -> list[list[float]]:
    """``scores[r][j] = sum_t log p(continuations[r][j][t] | contexts[r] + continuations[r][j][:t])``."""
    items = continuation_items(contexts, continuations, backend.max_length)
    if progress is not None:
        progress.total = len(items)
    values = _run_items(backend, items, batch_size, progress)
    scores = [[0.0] * len(conts) for conts in continuations]
    for item, v in zip(items, values):
        r, j = item.owner
        if j is None:
            scores[r] = list(v[0])
        else:
            scores[r][j] = math.fsum(x[0] for x in v)
    return scores


def perplexity(
    backend: Backend,
    token_ids: Sequence[int],
    seq_length: int,
    max_tokens: int,
    batch_size: int = 4,
    progress: Optional[Progress] = None,
) -> dict:
    """Perplexity over non-overlapping windows of ``seq_length`` tokens (each scored from its start)."""
    if seq_length < 2:
        raise ValueError(f"eval.ppl.seq_length={seq_length} must be >= 2")
    if seq_length > backend.max_length:
        raise ValueError(f"eval.ppl.seq_length={seq_length} exceeds the model's {backend.max_length} positions")
    windows = min(max_tokens, len(token_ids)) // seq_length
    if windows < 1:
        raise ValueError(
            f"eval.ppl: {len(token_ids)} tokens of text and max_tokens={max_tokens} leave no "
            f"window of seq_length={seq_length}"
        )
    items = []
    for w in range(windows):
        window = list(token_ids[w * seq_length:(w + 1) * seq_length])
        items.append(_Item(window[:-1], list(range(seq_length - 1)), [[t] for t in window[1:]], (w,)))
    if progress is not None:
        progress.total = len(items)
    values = _run_items(backend, items, batch_size, progress)
    nll = -math.fsum(x[0] for v in values for x in v)
    scored = windows * (seq_length - 1)
    return {
        "ppl": math.exp(nll / scored),
        "nll_per_token": nll / scored,
        "tokens_scored": scored,
        "windows": windows,
        "seq_length": seq_length,
    }


def scorer_for(backend: Backend, batch_size: int, progress: Optional[Progress] = None) -> Callable:
    """``score_continuations`` bound to a back end, as :func:`evaluate_mmlu` expects."""
    def score(contexts, continuations):
        return score_continuations(backend, contexts, continuations, batch_size, progress)
    return score
