"""The tokenizer folder an export copies, with a ``generation_config.json`` in it.

``transformers``' ``generate`` takes its bos/eos/pad ids from generation_config.json; without
one it falls back to the architecture's defaults (Mixtral's: ids 1 and 2), which belong to
another vocabulary. Kept as the dense model's own when the tokenizer folder has one; else
written from the dense model's config.json beside the tokenizer, else from the tokenizer's
special tokens.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_files

GENERATION_CONFIG = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def stated_token_ids(folder: Optional[Path]) -> dict:
    """bos/eos/pad ids a folder states: its config.json's (the dense model's, when the tokenizer
    is its HF folder), else its generation_config.json's (a tokenizer staged by
    ``with_generation_config``, as an export from a trained checkpoint has); else none."""
    for name in ("config.json", GENERATION_CONFIG):
        path = Path(folder) / name if folder is not None else None
        if path is not None and path.is_file():
            stated = json.loads(path.read_text())
            ids = {key: stated[key] for key in TOKEN_ID_KEYS if stated.get(key) is not None}
            if ids:
                return ids
    return {}


def special_token_ids(tokenizer_dir: Path) -> dict:
    """bos/eos/pad ids: the ones the folder states, else the tokenizer's special tokens."""
    ids = stated_token_ids(tokenizer_dir)
    if ids:
        return ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {key: getattr(tokenizer, key) for key in TOKEN_ID_KEYS if getattr(tokenizer, key, None) is not None}


def with_generation_config(tokenizer_dir: Optional[Path], staging: Path) -> Optional[Path]:
    """``tokenizer_dir`` if it holds a generation_config.json, else a copy of its tokenizer
    files in ``staging`` with one written by transformers' GenerationConfig."""
    if tokenizer_dir is None or (Path(tokenizer_dir) / GENERATION_CONFIG).is_file():
        return tokenizer_dir
    tokenizer_dir = Path(tokenizer_dir)
    ids = special_token_ids(tokenizer_dir)
    if not ids:
        return tokenizer_dir
    from transformers import GenerationConfig

    staging.mkdir(parents=True, exist_ok=True)
    for src in tokenizer_files(tokenizer_dir):
        shutil.copy2(src, staging / src.name)
    GenerationConfig(**ids).save_pretrained(str(staging))
    return staging
