"""python -m nemo_upcycle.import_dense source=<HF folder | file.gguf | embedded:smollm2_135m> output_dir=<dir>

Imports a Llama-architecture model into a megatron-core distributed checkpoint, one
tensor at a time: a dense Llama (HF safetensors folder, sharded or not, or a GGUF file)
becomes a dense checkpoint, a Mixtral folder an MoE checkpoint. ``dtype=float32|bfloat16|
float16`` converts the weights (default: as stored; float32 for GGUF). An existing
``output_dir`` is replaced only with ``overwrite=true``, and only once the new checkpoint
is complete.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from nemo_upcycle.checkpoint import importer
from nemo_upcycle.config.compose import CONFIG_DIR
from nemo_upcycle.errors import UserError
from nemo_upcycle.checkpoint.embedded import EMBEDDED_PREFIX, embedded_paths, is_embedded


@dataclass
class ImportConfig:
    source: str = MISSING
    output_dir: str = MISSING
    overwrite: bool = False
    dtype: Optional[str] = None
    progress: bool = True
    cache_dir: str = "${oc.env:NEMO_UPCYCLE_CACHE,${oc.env:HOME}/.cache/nemo_upcycle}"


ConfigStore.instance().store(name="import_dense_schema", node=ImportConfig)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise importer.ImportError_(f"dtype={name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def run_import(source: str, output_dir: Path, cache_dir: Optional[str] = None, overwrite: bool = False,
               dtype: Optional[str] = None, progress: bool = True) -> dict:
    output_dir = Path(output_dir)
    importer.check_output_dir(output_dir, overwrite)
    torch_dtype = parse_dtype(dtype)
    if is_embedded(source):
        from nemo_upcycle.assets import smollm2_gguf

        hf_dir = embedded_paths(cache_dir, source[len(EMBEDDED_PREFIX):])["hf"]
        if not hf_dir.is_dir():
            hf_dir.parent.mkdir(parents=True, exist_ok=True)
            importer.load_gguf_as_hf(smollm2_gguf(), hf_dir)
        return importer.import_hf_folder(hf_dir, output_dir, overwrite, torch_dtype, progress)
    path = Path(source)
    if source.endswith(".gguf"):
        return importer.import_gguf(path, output_dir, overwrite, torch_dtype or torch.float32, progress)
    if not path.exists():
        raise importer.ImportError_(f"source {path} does not exist")
    if not path.is_dir():
        raise importer.ImportError_(f"source {path} is neither a Hugging Face folder nor a .gguf file")
    return importer.import_hf_folder(path, output_dir, overwrite, torch_dtype, progress)


def summary_line(summary: dict, output_dir) -> str:
    return (
        f"imported {summary['tensors']} tensors ({summary['chunks']} chunks), "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s -> {output_dir}"
    )


@hydra.main(config_path=str(CONFIG_DIR), config_name="import_dense", version_base=None)
def main(cfg: ImportConfig) -> None:
    try:
        summary = run_import(cfg.source, Path(cfg.output_dir), cfg.cache_dir, cfg.overwrite, cfg.dtype, cfg.progress)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(summary, cfg.output_dir), flush=True)


if __name__ == "__main__":
    main()
