"""A Hugging Face tokenizer as its own small folder.

A model folder often holds its tokenizer beside gigabytes of weights. NeMo copies the
whole tokenizer folder into every checkpoint's ``context/``, and the export copies the
tokenizer into the Hugging Face folder it writes; both need the tokenizer files alone.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def tokenizer_files(folder: Path) -> list[Path]:
    return [Path(folder) / name for name in TOKENIZER_FILES
            if (Path(folder) / name).is_file() and not is_gguf_copy(Path(folder) / name)]


def is_gguf_copy(path: Path) -> bool:
    """transformers saves a tokenizer loaded from a GGUF file with the whole GGUF file (weights
    included) as its ``tokenizer.model``; tokenizer.json holds the real tokenizer."""
    if path.name != "tokenizer.model" or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def tokenizer_digest(folder: Path) -> str:
    """A short hash of the tokenizer files' contents: same tokenizer, same digest."""
    h = hashlib.sha256()
    for f in tokenizer_files(folder):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def tokenizer_only_folder(folder: Path, cache_dir: Path) -> Path:
    """``cache_dir/tokenizers/<name>-<digest>``: a copy of just the tokenizer files.

    Every rank may call it at once: each file is copied under a name of its own and
    renamed into place, so readers never see a partial file and writers never clash.
    """
    folder = Path(folder)
    out = Path(cache_dir) / "tokenizers" / f"{folder.name}-{tokenizer_digest(folder)}"
    out.mkdir(parents=True, exist_ok=True)
    for src in tokenizer_files(folder):
        dst = out / src.name
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            continue
        tmp = out / f".{src.name}.{os.getpid()}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return out
