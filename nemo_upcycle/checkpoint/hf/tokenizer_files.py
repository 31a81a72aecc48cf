"""Where a job's Hugging Face tokenizer is, and that tokenizer as its own small folder.

:func:`tokenizer_folder` is the one answer to "which tokenizer?" for every entry point.
A model folder often holds its tokenizer beside gigabytes of weights. NeMo copies the
whole tokenizer folder into every checkpoint's ``context/``, and the export copies the
tokenizer into the Hugging Face folder it writes; both need the tokenizer files alone.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
# Any one of these makes a folder a tokenizer folder (the others are optional extras).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: Optional[Path]) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_MARKERS)


def tokenizer_folder(cfg: Any, import_embedded: bool = True, explicit: Optional[str] = None,
                     also_look_in: Sequence[Optional[str]] = ()) -> Optional[Path]:
    """The tokenizer a job uses, the first of: ``explicit`` (an entry point's own setting,
    e.g. ``export.tokenizer``), ``model.tokenizer``, the first folder of ``also_look_in`` that
    holds a tokenizer (e.g. the HF model being evaluated), the one beside the dense weights.

    None: there is none (the byte-level tiny test models). With ``import_embedded=False`` an
    embedded model's folder is named without importing it (preflight checks must not start
    the first run's import).
    """
    from omegaconf import OmegaConf

    from nemo_upcycle.checkpoint.sources.embedded import EMBEDDED_PREFIX, embedded_paths, ensure_embedded, is_embedded

    given = explicit or cfg.model.tokenizer
    if given:
        return Path(given)
    found = next((Path(f) for f in also_look_in if f and has_tokenizer(Path(f))), None)
    if found is not None:
        return found
    if OmegaConf.is_config(cfg.model) and OmegaConf.is_missing(cfg.model, "dense_checkpoint"):
        return None
    ckpt = str(cfg.model.dense_checkpoint)
    if is_embedded(ckpt):
        if import_embedded:
            return ensure_embedded(ckpt, cfg.cache_dir)["hf"]
        return embedded_paths(cfg.cache_dir, ckpt[len(EMBEDDED_PREFIX):])["hf"]
    path = Path(ckpt)
    # HF folders carry their tokenizer; NeMo 2 checkpoints keep it in their context.
    for folder in (path, path / "context" / "nemo_tokenizer", path.parent / "context" / "nemo_tokenizer"):
        if has_tokenizer(folder):
            return folder
    return None


def tokenizer_files(folder: Optional[Path]) -> list[Path]:
    """The tokenizer files in ``folder`` (none for a missing folder or None)."""
    if folder is None:
        return []
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
