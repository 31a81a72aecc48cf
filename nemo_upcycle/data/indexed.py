"""Tokenize text into megatron-core's indexed dataset format (.bin/.idx), once, cached.

The prefix is written under a temporary name and renamed when complete, so a crash
never leaves a dataset that looks finished.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch


def dataset_ready(prefix: Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def write_indexed_dataset(
    documents: Iterable[str], tokenizer, prefix: Path, append_eod: bool = True, progress: bool = True
) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from nemo_upcycle.util.progress import progress_bar

    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
    dtype = np.int32 if len(tokenizer) > 65500 else np.uint16
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    eod = tokenizer.eos_token_id
    docs = tokens = 0
    for text in progress_bar(documents, desc="tokenize", unit="doc", disable=not progress):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if append_eod and eod is not None:
            ids.append(eod)
        builder.add_document(torch.tensor(ids), [len(ids)])
        docs += 1
        tokens += len(ids)
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    summary = {"documents": docs, "tokens": tokens}
    Path(f"{prefix}.json").write_text(json.dumps(summary))
    return summary


def jsonl_documents(path: Path, key: str = "text") -> Iterable[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                yield json.loads(line)[key]


def tokenizer_tag(tokenizer_path: Optional[Path]) -> str:
    """Names the tokenized-data cache: by content, so two tokenizers never share one."""
    from nemo_upcycle.checkpoint.tokenizer_files import tokenizer_digest

    return f"{Path(tokenizer_path).name}-{tokenizer_digest(tokenizer_path)}" if tokenizer_path else "bytes"
