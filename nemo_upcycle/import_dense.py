"""python -m nemo_upcycle.import_dense source=<HF folder | file.gguf | embedded:smollm2_135m> output_dir=<dir>

Imports a dense Llama-architecture model into a megatron-core distributed checkpoint.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from nemo_upcycle.checkpoint import importer
from nemo_upcycle.checkpoint.embedded import EMBEDDED_PREFIX, embedded_paths, is_embedded


@dataclass
class ImportConfig:
    source: str = MISSING
    output_dir: str = MISSING
    overwrite: bool = False
    cache_dir: str = "${oc.env:NEMO_UPCYCLE_CACHE,${oc.env:HOME}/.cache/nemo_upcycle}"


ConfigStore.instance().store(name="import_dense", node=ImportConfig)


def _hf_folder_getter(folder: Path):
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise importer.ImportError_(f"{folder} has no *.safetensors files")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                index[key] = f

    def get(key: str):
        if key not in index:
            raise importer.ImportError_(f"tensor {key} is missing from {folder}")
        with safe_open(str(index[key]), framework="pt") as handle:
            return handle.get_tensor(key).float()

    return get


def run_import(source: str, output_dir: Path, cache_dir: Optional[str] = None, overwrite: bool = False) -> dict:
    from transformers import AutoConfig

    if output_dir.exists():
        if not overwrite:
            raise importer.ImportError_(
                f"output_dir {output_dir} already exists; choose another or pass overwrite=true"
            )
        import shutil
        shutil.rmtree(output_dir)
    if is_embedded(source):
        from nemo_upcycle.assets import smollm2_gguf

        hf_dir = embedded_paths(cache_dir, source[len(EMBEDDED_PREFIX):])["hf"]
        if not hf_dir.is_dir():
            hf_dir.parent.mkdir(parents=True, exist_ok=True)
            importer.load_gguf_as_hf(smollm2_gguf(), hf_dir)
        folder = hf_dir
    elif source.endswith(".gguf"):
        model, _ = importer.load_gguf_as_hf(Path(source))
        arch = importer.DenseArchitecture.from_hf_config(model.config)
        state = model.state_dict()
        return importer.write_torch_dist(lambda k: state[k], arch, output_dir)
    else:
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise importer.ImportError_(f"{folder} is not a Hugging Face model folder (no config.json)")
    arch = importer.DenseArchitecture.from_hf_config(AutoConfig.from_pretrained(str(folder)))
    return importer.write_torch_dist(_hf_folder_getter(folder), arch, output_dir)


@hydra.main(config_path=None, config_name="import_dense", version_base=None)
def main(cfg: ImportConfig) -> None:
    try:
        summary = run_import(cfg.source, Path(cfg.output_dir), cfg.cache_dir, cfg.overwrite)
    except importer.ImportError_ as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(
        f"imported {summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in "
        f"{summary['seconds']:.1f}s -> {cfg.output_dir}"
    )


if __name__ == "__main__":
    main()
