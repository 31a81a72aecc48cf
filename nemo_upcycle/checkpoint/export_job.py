"""``export_hf``'s job: check the request, find or make the MoE weights, write the folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf


def tokenizer_dir(cfg: Any) -> Optional[Path]:
    """The tokenizer folder to copy into the export (None when there is none)."""
    from nemo_upcycle.checkpoint.tokenizer_files import tokenizer_folder

    return tokenizer_folder(cfg, explicit=cfg.export.tokenizer)


def upcycled_source(cfg: Any):
    """Upcycle the dense model to ``cfg.moe`` on this single process; the model as a source."""
    from nemo_upcycle.checkpoint.dense_source import open_dense_source
    from nemo_upcycle.checkpoint.model_source import ModelSource
    from nemo_upcycle.model.modeling import build_model_chunks, build_transformer_config
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.util.ports import single_process_rendezvous

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
    """Every check first (no weight read, no file written), then one tensor at a time."""
    from nemo_upcycle.checkpoint.dtypes import parse_dtype
    from nemo_upcycle.checkpoint.exporter import ExportError, check_exportable, export_hf
    from nemo_upcycle.checkpoint.dense_source import resolve_dense_model
    from nemo_upcycle.upcycle.sources import CheckpointFormatError, TorchDistCheckpoint
    from nemo_upcycle.util.atomic import refuse_existing

    ex = cfg.export
    if not ex.output_dir:
        raise ExportError("output_dir is required: nemo-upcycle export_hf checkpoint=... output_dir=...")
    output_dir = Path(ex.output_dir)
    refuse_existing(output_dir, ex.overwrite, ExportError)  # before anything is upcycled
    dtype = parse_dtype(ex.dtype, ExportError)
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
    return export_hf(source, cfg, output_dir, tokenizer_dir=tokenizer_dir(cfg), overwrite=ex.overwrite,
                     dtype=dtype, max_shard_bytes=int(ex.max_shard_size_gb * 1e9), progress=ex.progress)
