"""Resolve ``data.*`` to megatron indexed-dataset prefixes (with blend weights)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.data.indexed import dataset_ready, jsonl_documents, tokenizer_tag, write_indexed_dataset
from nemo_upcycle.util.rank0_builds import build_on_rank0

EMBEDDED_DATA = "embedded:gensim_wiki"


def _build_once(prefix: Path, build) -> None:
    build_on_rank0(lambda: dataset_ready(prefix), build, f"tokenizing the dataset {prefix}")


def resolve_data_paths(cfg: Any, tokenizer_path: Optional[Path]) -> list:
    """Blend list for NeMo's PreTrainingDataModule: [w1, prefix1, w2, prefix2, ...] or [prefix]."""
    from nemo_upcycle.data.text import load_tokenizer

    data = cfg.data
    cache = Path(data.cache_dir or Path(cfg.cache_dir) / "data") / tokenizer_tag(tokenizer_path)
    if data.jsonl:
        jsonl = Path(data.jsonl)
        if not jsonl.is_file():
            raise FileNotFoundError(f"data.jsonl={jsonl} does not exist")
        prefix = cache / f"{jsonl.stem}_text_document"
        _build_once(prefix, lambda: write_indexed_dataset(
            jsonl_documents(jsonl), load_tokenizer(str(tokenizer_path)), prefix))
        return [str(prefix)]
    if data.paths == EMBEDDED_DATA:
        from nemo_upcycle.data.assets import wikipedia_sample
        from nemo_upcycle.data.wikipedia import iter_articles

        if tokenizer_path is None:
            raise ValueError("the embedded Wikipedia data needs a tokenizer: set model.tokenizer")
        prefix = cache / "gensim_wiki_text_document"
        _build_once(prefix, lambda: write_indexed_dataset(
            iter_articles(wikipedia_sample()), load_tokenizer(str(tokenizer_path)), prefix))
        return [str(prefix)]
    paths = list(data.paths) if not isinstance(data.paths, str) else [data.paths]
    prefixes = [p for p in paths if not _is_number(p)]
    missing = [p for p in prefixes if not dataset_ready(Path(str(p)))]
    if missing:
        raise FileNotFoundError(
            f"data.paths: no megatron indexed dataset at {missing} (expected <prefix>.bin and "
            "<prefix>.idx); give .bin/.idx prefixes, optionally weighted as [0.7, a, 0.3, b], "
            "or data.jsonl=<file> to tokenize JSONL text"
        )
    return [str(p) for p in paths]


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
