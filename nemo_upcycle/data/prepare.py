"""Resolve ``data.*`` to megatron indexed-dataset prefixes (with blend weights).

JSONL text is tokenized once into the cache, under a name made of the files' *content*
(a hash, computed by rank 0 once per state of the files), the text field and the
tokenizer's digest: an edited file, or another file of the same name, gets its own tokens. ``nemo-upcycle prepare_data`` writes the same
``.bin/.idx`` ahead of the job, to a prefix of your choice (``data.paths=<prefix>`` then
trains on it without tokenizing on rank 0).
"""
from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.data.indexed import dataset_ready, default_workers, jsonl_documents, tokenizer_tag, write_indexed_dataset
from nemo_upcycle.errors import UserError
from nemo_upcycle.util.rank0_builds import build_on_rank0

EMBEDDED_DATA = "embedded:gensim_wiki"
# Rank 0 tokenizing JSONL inside a job: the other ranks wait this long (a large corpus is
# prepared ahead with prepare_data instead).
TOKENIZE_DEADLINE_S = 4 * 3600.0


class DataError(UserError):
    """``data.*`` names no usable data."""


def jsonl_files(jsonl: Any) -> list[Path]:
    """``data.jsonl`` (a file, a glob, or a list of either) as files, in the order given
    (each glob's matches sorted); a name or glob that matches nothing is an error."""
    patterns = [jsonl] if isinstance(jsonl, (str, Path)) else list(jsonl)
    files, unmatched = [], []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
        else:
            matches = [pattern] if Path(pattern).is_file() else []
        files.extend(Path(m) for m in matches)
        if not matches:
            unmatched.append(pattern)
    if unmatched:
        raise DataError(f"data.jsonl: no file at {', '.join(unmatched)} (give JSONL files or a glob such as "
                        "'corpus/*.jsonl')")
    return files


def check_first_records(files: list[Path], text_field: str) -> None:
    """Each file's first record holds ``text_field``: a misspelt field is refused before any
    file is written (the tokenizer checks every later line as it reads it)."""
    for path in files:
        next(iter(jsonl_documents([path], text_field)), None)


def content_digest(files: list[Path], *also: str) -> str:
    """A hash of the files' bytes (and of ``also``): the name of their tokens in the cache."""
    digest = hashlib.blake2b(digest_size=8)
    for item in also:
        digest.update(item.encode() + b"\0")
    for path in files:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digest.update(b"\0file\0")
    return digest.hexdigest()


def content_digest_once(files: list[Path], text_field: str, cache: Path) -> str:
    """:func:`content_digest` computed by rank 0 alone, once per state of the files: kept under
    a name made of their paths, sizes, inodes and modification times, so the other ranks and
    every relaunch read the hash instead of the whole corpus. Rewriting a file changes its
    modification time, so its bytes are hashed again."""
    from nemo_upcycle.util.atomic import write_text_atomic

    state = hashlib.blake2b(text_field.encode(), digest_size=16)
    for path in files:
        st = path.stat()
        state.update(f"{path.resolve()}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0".encode())
    memo = cache / "jsonl_digests" / state.hexdigest()
    build_on_rank0(memo.is_file, lambda: write_text_atomic(memo, content_digest(files, text_field)),
                   f"hashing data.jsonl ({len(files)} file(s))", TOKENIZE_DEADLINE_S, where=str(memo.parent))
    return memo.read_text()


def tokenize_jsonl(files: list[Path], text_field: str, tokenizer_path: Path, prefix: Path,
                   workers: Optional[int]) -> dict:
    return write_indexed_dataset(jsonl_documents(files, text_field), tokenizer_path, prefix,
                                 workers=workers or default_workers(), description=f"tokenize {len(files)} JSONL file(s)")


def _build_once(prefix: Path, build, timeout_s: float = 900.0) -> None:
    build_on_rank0(lambda: dataset_ready(prefix), build, f"tokenizing the dataset {prefix}", timeout_s,
                   where=str(prefix.parent))


def resolve_data_paths(cfg: Any, tokenizer_path: Optional[Path]) -> list:
    """Blend list for NeMo's PreTrainingDataModule: [w1, prefix1, w2, prefix2, ...] or [prefix]."""
    data = cfg.data
    cache = Path(data.cache_dir or Path(cfg.cache_dir) / "data") / tokenizer_tag(tokenizer_path)
    if data.jsonl:
        files = jsonl_files(data.jsonl)
        if tokenizer_path is None:
            raise DataError("data.jsonl needs a tokenizer: set model.tokenizer")
        check_first_records(files, data.text_field)
        # The name says what the tokens are: the files' content, the field read, the tokenizer (the folder).
        prefix = cache / f"jsonl-{files[0].stem}-{content_digest_once(files, data.text_field, cache)}_text_document"
        _build_once(prefix, lambda: tokenize_jsonl(files, data.text_field, tokenizer_path, prefix, data.workers),
                    TOKENIZE_DEADLINE_S)
        return [str(prefix)]
    if data.paths == EMBEDDED_DATA:
        from nemo_upcycle.data.assets import wikipedia_sample
        from nemo_upcycle.data.wikipedia import iter_articles

        if tokenizer_path is None:
            raise DataError("the embedded Wikipedia data needs a tokenizer: set model.tokenizer")
        prefix = cache / "gensim_wiki_text_document"
        # One process: the sample is small, and parsing its XML, not tokenizing, is the slow part.
        _build_once(prefix, lambda: write_indexed_dataset(iter_articles(wikipedia_sample()), tokenizer_path, prefix))
        return [str(prefix)]
    paths = list(data.paths) if not isinstance(data.paths, str) else [data.paths]
    missing = [p for p in blend_prefixes(paths) if not dataset_ready(Path(p))]
    if missing:
        raise DataError(
            f"data.paths: no megatron indexed dataset at {missing} (expected <prefix>.bin and "
            "<prefix>.idx); give .bin/.idx prefixes (e.g. written by `nemo-upcycle prepare_data`), "
            "optionally weighted as [0.7, a, 0.3, b], or data.jsonl=<files or glob> to tokenize JSONL text"
        )
    return [str(p) for p in paths]


def blend_prefixes(paths: list) -> list[str]:
    """The dataset prefixes of a blend list (its weights left out)."""
    return [str(p) for p in paths if not _is_number(p)]


def blend_weights(paths: list) -> list[float]:
    """Each prefix's share of the training samples, its weight normalised; [] when the paths
    carry no weights (megatron then blends whole datasets by size: data/epochs.py counts that)."""
    weights = [float(p) for p in paths if _is_number(p)]
    if weights:
        return [w / sum(weights) for w in weights]
    return []


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
