"""python -m nemo_upcycle.export_hf checkpoint=<MoE torch_dist ckpt> output_dir=<dir> [model=... moe=... router=...]

Writes a Hugging Face folder that ``transformers.MixtralForCausalLM`` loads with no custom
code (``LlamaForCausalLM`` for ``moe=dense``): config.json whose experts, top-k and router
settings match the configuration, safetensors shards written one tensor at a time, and
the dense model's tokenizer files.

Without ``checkpoint``, the dense model of ``model.dense_checkpoint`` (a torch_dist
checkpoint, a Hugging Face folder, or ``embedded:smollm2_135m``) is upcycled to the
configured ``moe`` on this one process and the step-0 MoE is exported: the offline path
for a Hugging Face MoE to fine-tune elsewhere.

``checkpoint=``, ``output_dir=``, ``overwrite=``, ``dtype=``, ``max_shard_size_gb=`` and
``tokenizer=`` are shorthands for ``export.<name>=``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.cli import CONFIG_DIR, resolve_dense_model
from nemo_upcycle.config.schema import register_configs

register_configs()

SHORTHANDS = ("checkpoint", "output_dir", "overwrite", "dtype", "max_shard_size_gb", "tokenizer", "progress")


def expand_shorthands(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name = arg.split("=", 1)[0]
        out.append(f"export.{arg}" if "=" in arg and name in SHORTHANDS else arg)
    return out


def tokenizer_dir(cfg: Any) -> Optional[Path]:
    """The tokenizer folder to copy into the export (None when there is none)."""
    from nemo_upcycle.checkpoint.dense_source import tokenizer_folder

    return Path(cfg.export.tokenizer) if cfg.export.tokenizer else tokenizer_folder(cfg)


def upcycled_source(cfg: Any):
    """Upcycle the dense model to ``cfg.moe`` on this single process; the model as a source."""
    from nemo_upcycle.checkpoint.exporter import ModelSource
    from nemo_upcycle.checkpoint.dense_source import open_dense_source
    from nemo_upcycle.modeling import build_model_chunks, build_transformer_config
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.platform.ports import single_process_rendezvous
    from nemo_upcycle.upcycle.engine import upcycle_from_dense

    single = OmegaConf.merge(cfg, {"parallel": {"tp": 1, "pp": 1, "vpp": None, "ep": 1, "etp": None,
                                                "cp": 1, "sp": False, "world_size": None}})
    source = open_dense_source(single)
    single_process_rendezvous()
    setup_parallel(single.parallel, single.seed)
    # Every weight is about to be written by the upcycling: skip the random initialisation.
    chunks = build_model_chunks(single, build_transformer_config(single, perform_initialization=False))
    report = upcycle_from_dense(chunks, single, source)
    print(f"upcycled {cfg.model.name} to {cfg.moe.name} in {report.seconds:.1f}s "
          f"({report.bytes_read / 1e6:.1f} MB read)", flush=True)
    return ModelSource(chunks)


def run_export(cfg: Any) -> dict:
    from nemo_upcycle.checkpoint.exporter import ExportError, check_exportable, export_hf
    from nemo_upcycle.import_dense import DTYPES
    from nemo_upcycle.upcycle.sources import CheckpointFormatError, TorchDistCheckpoint

    ex = cfg.export
    if not ex.output_dir:
        raise ExportError("output_dir is required: python -m nemo_upcycle.export_hf checkpoint=... output_dir=...")
    output_dir = Path(ex.output_dir)
    if output_dir.exists() and not ex.overwrite:
        raise ExportError(f"output_dir {output_dir} already exists; choose another or pass overwrite=true")
    if ex.dtype is not None and ex.dtype not in DTYPES:
        raise ExportError(f"dtype={ex.dtype!r}: use one of {', '.join(DTYPES)}")
    if not ex.checkpoint:
        resolve_dense_model(cfg)  # model=auto: the architecture from the dense checkpoint
    check_exportable(cfg)  # before any weight is read or upcycled
    if ex.checkpoint:
        try:
            source = TorchDistCheckpoint(ex.checkpoint)
        except CheckpointFormatError as err:
            raise ExportError(str(err)) from None
    else:
        source = upcycled_source(cfg)
    return export_hf(
        source, cfg, output_dir, tokenizer_dir=tokenizer_dir(cfg), overwrite=ex.overwrite,
        dtype=DTYPES[ex.dtype] if ex.dtype else None,
        max_shard_bytes=int(ex.max_shard_size_gb * 1e9), progress=ex.progress,
    )


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_upcycle.errors import UserError

    try:
        summary = run_export(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    print(
        f"exported {summary['architecture']}: {summary['tensors']} tensors in {summary['shards']} shard(s), "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s -> {cfg.export.output_dir}",
        flush=True,
    )


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + expand_shorthands(sys.argv[1:])
    main()
