"""Tokenize text into megatron-core's indexed dataset format (.bin/.idx), and count its tokens.

The prefix is written under a temporary name and renamed when complete, so a crash
never leaves a dataset that looks finished. Tokenizing runs in worker processes (each
loads the tokenizer once) fed with chunks of documents in order, so the result is the same
for any number of workers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

# Documents per task handed to a tokenizing worker: large enough that pickling is cheap
# beside tokenizing, small enough that the progress bar moves.
CHUNK_DOCUMENTS = 256


def dataset_ready(prefix: Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def dataset_tokens(prefix: Path | str) -> int:
    """Tokens in a megatron indexed dataset: the sum of its sequence lengths, read from the .idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    # Summed while `dataset` lives: its sequence_lengths is a view of the .idx mmap that the
    # dataset closes when it is collected (a temporary's view segfaults).
    tokens = int(dataset.sequence_lengths.sum(dtype=np.int64))
    del dataset
    return tokens


def default_workers() -> int:
    """Tokenizing processes when ``data.workers`` is null: the CPUs this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


_worker_tokenizer = None


def _load_worker_tokenizer(tokenizer_path: str) -> None:
    global _worker_tokenizer
    from nemo_upcycle.data.text import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _tokenize_chunk(texts: Sequence[str], append_eod: bool = True) -> list[np.ndarray]:
    tokenizer = _worker_tokenizer
    eod = tokenizer.eos_token_id if append_eod else None
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [np.asarray(doc + [eod] if eod is not None else doc, dtype=np.int64) for doc in ids]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_indexed_dataset(documents: Iterable[str], tokenizer_path: Path | str, prefix: Path, workers: int = 1,
                          progress: bool = True, description: str = "tokenize") -> dict:
    """Tokenize ``documents`` (an EOD token after each) into ``prefix``.bin/.idx with ``workers``
    processes; returns {"documents": n, "tokens": n} (also written to ``prefix``.json)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from nemo_upcycle.util.progress import progress_bar

    _load_worker_tokenizer(str(tokenizer_path))
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
    dtype = np.int32 if len(_worker_tokenizer) > 65500 else np.uint16
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    docs = tokens = 0
    pool = None
    if workers > 1:
        import multiprocessing

        # spawn, not fork: the parent holds torch's threads (and, in a training job, more).
        pool = multiprocessing.get_context("spawn").Pool(workers, _load_worker_tokenizer, (str(tokenizer_path),))
    finished = False
    try:
        chunks = _chunks(documents, CHUNK_DOCUMENTS)
        results = pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)
        with progress_bar(desc=description, unit="doc", disable=not progress) as bar:
            for chunk in results:
                for ids in chunk:
                    builder.add_document(torch.from_numpy(ids), [len(ids)])
                    tokens += len(ids)
                docs += len(chunk)
                bar.update(len(chunk))
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
        finished = True
    finally:
        if pool is not None:
            pool.terminate()
        if not finished:  # a bad line or an interrupt: leave nothing that looks like a dataset
            for leftover in (f"{tmp}.bin", f"{tmp}.idx"):
                Path(leftover).unlink(missing_ok=True)
    summary = {"documents": docs, "tokens": tokens}
    Path(f"{prefix}.json").write_text(json.dumps(summary))
    return summary


def jsonl_documents(paths: Sequence[Path], key: str = "text") -> Iterator[str]:
    """The ``key`` field of every line of every file, in order; a line without it is an error
    naming the file and line (a misspelt ``data.text_field`` must not produce an empty corpus)."""
    from nemo_upcycle.errors import UserError

    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}, line {number} is not JSON ({err.msg}): data.jsonl takes one "
                                    "JSON object per line") from None
                if not isinstance(record, dict) or key not in record:
                    raise UserError(f"{path}, line {number}: no field {key!r} (fields: {', '.join(record) if isinstance(record, dict) else type(record).__name__}); "
                                    "set data.text_field to the field that holds the text")
                yield record[key]


def tokenizer_tag(tokenizer_path: Optional[Path]) -> str:
    """Names the tokenized-data cache: by content, so two tokenizers never share one."""
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_digest

    return f"{Path(tokenizer_path).name}-{tokenizer_digest(tokenizer_path)}" if tokenizer_path else "bytes"
