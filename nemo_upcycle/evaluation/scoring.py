"""Batched log-likelihood read-outs from a model that answers one question.

A back end (:class:`nemo_upcycle.evaluation.backends.MegatronBackend`) answers: for a batch of
token sequences, the log-probability (log-softmax over the whole vocabulary) of some token ids
at some positions, and the largest log-probability there (whether the token read is the greedy
one). lm-evaluation-harness's requests (:mod:`nemo_upcycle.evaluation.harness`) are turned
into :class:`Readout` items and batched here.

Batches are right-padded: with causal attention a real token never sees a padding token, so
the positions that are read are exact whatever the padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

LOG_SOFTMAX_ROWS = 512


class Backend(Protocol):
    # Longest sequence the model takes (its position embeddings).
    max_length: int

    def selected_logprobs(
        self, sequences: Sequence[Sequence[int]], rows: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """``out[n, k] = log p(token_ids[n, k] | sequences[rows[n, 0]][: rows[n, 1] + 1])`` for
        k < K, and ``out[n, K]`` = the largest log-probability at that position.

        ``rows``: (N, 2) long (sequence index, position); ``token_ids``: (N, K) long;
        returns (N, K + 1) float64 on the host, the same on every rank.
        """
        ...


def pick_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[log_softmax(logits)[n, token_ids[n, k]] for k, then max_v log_softmax(logits)[n, v]]
    as float64, in slices to bound memory, on the logits' device."""
    token_ids = token_ids.to(logits.device)
    out = torch.empty((token_ids.shape[0], token_ids.shape[1] + 1), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], LOG_SOFTMAX_ROWS):
        stop = start + LOG_SOFTMAX_ROWS
        block = torch.log_softmax(logits[start:stop].float(), dim=-1)
        out[start:stop, :-1] = block.gather(1, token_ids[start:stop]).double()
        out[start:stop, -1] = block.max(dim=-1).values.double()
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
class Readout:
    """One sequence to run and what to read from it: at ``positions[i]`` the log-probs of the
    ids ``token_ids[i]``."""

    tokens: list[int]
    positions: list[int]
    token_ids: list[list[int]]


@dataclass
class Read:
    """What came back for one position: the wanted ids' log-probs and the largest one."""

    logprobs: list[float]
    best: float


def run_readouts(backend: Backend, items: Sequence[Readout], batch_size: int, progress=None) -> list[list[Read]]:
    """Per item, per position, the :class:`Read`. Items run longest first, ``batch_size`` at a
    time (similar lengths share a batch: less padding); ``progress`` (a tqdm bar) advances by
    items."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].tokens), i))
    values: list = [None] * len(items)
    for start in range(0, len(order), batch_size):
        batch_ids = order[start:start + batch_size]
        batch = [items[i] for i in batch_ids]
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
        ).tolist()
        cursor = 0
        for index, item in zip(batch_ids, batch):
            reads = []
            for wanted in item.token_ids:
                reads.append(Read(out[cursor][: len(wanted)], out[cursor][-1]))
                cursor += 1
            values[index] = reads
        if progress is not None:
            progress.update(len(batch))
    return values


def continuation_readouts(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> tuple[list[Readout], list[tuple[int, int]]]:
    """Readouts that give log p(continuation | context) for each (context, continuation) pair,
    truncated as lm-evaluation-harness's Hugging Face model does: the model sees
    ``(context + continuation)[-(max_length + 1):][:-1]``.

    Requests with the same context and one-token continuations (multiple-choice letters) share
    one sequence, read once at its last position. Returns the readouts and, per request,
    (readout index, index of its id in that readout's last position, or -1 for a whole
    continuation read position by position).
    """
    items: list[Readout] = []
    where: list[tuple[int, int]] = []
    shared: dict[tuple[int, ...], int] = {}
    for r, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {r}: an empty continuation cannot be scored")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        tokens = whole[:-1]
        if not tokens:
            raise ValueError(f"request {r}: an empty context cannot be scored")
        if len(cont) == 1:
            key = tuple(tokens)
            if key not in shared:
                shared[key] = len(items)
                items.append(Readout(tokens, [len(tokens) - 1], [[]]))
            item = items[shared[key]]
            where.append((shared[key], len(item.token_ids[0])))
            item.token_ids[0].append(cont[0])
            continue
        n = min(len(cont), len(tokens))  # a continuation longer than the window: its last tokens
        positions = list(range(len(tokens) - n, len(tokens)))
        items.append(Readout(tokens, positions, [[t] for t in whole[len(whole) - n:]]))
        where.append((len(items) - 1, -1))
    return items, where


def continuation_loglikelihoods(backend: Backend, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                                batch_size: int, progress=None) -> list[tuple[float, bool]]:
    """``(sum_t log p(cont[t] | ctx + cont[:t]), every cont[t] greedy)`` per (ctx, cont) request:
    lm-evaluation-harness's ``loglikelihood`` answer."""
    import math

    items, where = continuation_readouts(requests, backend.max_length)
    if progress is not None:
        progress.reset(total=len(items))
    values = run_readouts(backend, items, batch_size, progress)
    answers: list[tuple[float, bool]] = []
    for item_index, slot in where:
        reads = values[item_index]
        if slot >= 0:
            read = reads[0]
            answers.append((read.logprobs[slot], read.logprobs[slot] >= read.best))
        else:
            answers.append((math.fsum(r.logprobs[0] for r in reads), all(r.logprobs[0] >= r.best for r in reads)))
    return answers
