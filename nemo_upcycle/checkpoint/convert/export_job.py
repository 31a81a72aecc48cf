"""``export_hf``'s job: check the request, find or make the MoE weights, write the folder."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf


def tokenizer_dir(cfg: Any) -> Optional[Path]:
    """The tokenizer folder to copy into the export (None when there is none)."""
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder

    return tokenizer_folder(cfg, explicit=cfg.export.tokenizer)


def upcycled_source(cfg: Any):
    """Upcycle the dense model to ``cfg.moe`` on this single process; the model as a source."""
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.checkpoint.sources.in_memory import ModelSource
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


class CountingSource:
    """A source that adds up what its reads cost (the export's summary line reports it)."""

    def __init__(self, source):
        self.source = source
        self.bytes_read = 0
        self.keys_read: set = set()

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def read(self, requests):
        stats = self.source.read(requests)
        self.bytes_read += stats.bytes_read
        self.keys_read |= stats.keys
        return stats


def optimizer_state_bytes(checkpoint) -> int:
    """Bytes of optimizer state a torch_dist checkpoint stores (from its metadata: nothing read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    total = 0
    for key, md in checkpoint.metadata.state_dict_metadata.items():
        if key.startswith("optimizer.") and isinstance(md, TensorStorageMetadata):
            total += md.size.numel() * md.properties.dtype.itemsize
    return total


def trained_source(cfg: Any, overrides: Sequence[str]):
    """The checkpoint ``export.checkpoint`` names, with ``cfg`` set to the job it was trained with."""
    from nemo_upcycle.checkpoint.convert.exporter import ExportError
    from nemo_upcycle.checkpoint.stored_config import apply_stored_job
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint
    from nemo_upcycle.checkpoint.sources.torch_dist import CheckpointFormatError, TorchDistCheckpoint

    trained = find_checkpoint(cfg.export.checkpoint)
    apply_stored_job(cfg, trained, overrides)
    try:
        return trained, TorchDistCheckpoint(trained.weights)
    except CheckpointFormatError as err:
        raise ExportError(str(err)) from None


def run_export(cfg: Any, overrides: Optional[Sequence[str]] = None) -> dict:
    """Every check first (no weight read, no file written), then one tensor at a time.

    ``overrides``: the command line's (default: Hydra's), checked against the configuration
    a trained checkpoint states.
    """
    from nemo_upcycle.checkpoint.convert.dtypes import parse_dtype
    from nemo_upcycle.checkpoint.convert.exporter import ExportError, check_exportable, export_hf
    from nemo_upcycle.checkpoint.sources.dense_source import resolve_dense_model
    from nemo_upcycle.checkpoint.hf.generation_config import with_generation_config
    from nemo_upcycle.checkpoint.stored_config import explicit_overrides
    from nemo_upcycle.util.atomic import refuse_existing

    ex = cfg.export
    if not ex.output_dir:
        raise ExportError("output_dir is required: nemo-upcycle export_hf checkpoint=... output_dir=...")
    output_dir = Path(ex.output_dir)
    refuse_existing(output_dir, ex.overwrite, ExportError)  # before anything is upcycled
    dtype = parse_dtype(ex.dtype, ExportError)
    trained = checkpoint = None
    if ex.checkpoint:
        trained, checkpoint = trained_source(cfg, explicit_overrides() if overrides is None else overrides)
    else:
        resolve_dense_model(cfg)  # model=auto: the architecture from the dense checkpoint
    check_exportable(cfg)  # before any weight is read or upcycled
    source = CountingSource(checkpoint if checkpoint is not None else upcycled_source(cfg))
    with tempfile.TemporaryDirectory(prefix="export-tokenizer-") as staging:
        tokenizer = with_generation_config(tokenizer_dir(cfg), Path(staging) / "tokenizer")
        summary = export_hf(source, cfg, output_dir, tokenizer_dir=tokenizer, overwrite=ex.overwrite,
                            dtype=dtype, max_shard_bytes=int(ex.max_shard_size_gb * 1e9), progress=ex.progress)
    if trained is not None:
        summary.update(checkpoint=str(trained.root), bytes_read=source.bytes_read,
                       optimizer_bytes_skipped=optimizer_state_bytes(checkpoint),
                       keys_read=sorted(source.keys_read), config_from_checkpoint=trained.job is not None)
    return summary


def summary_line(summary: dict, output_dir: str) -> str:
    """The export's one line: what was written, from what, what it cost."""
    line = (f"exported {summary['architecture']}: {summary['tensors']} tensors in {summary['shards']} shard(s), "
            f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s -> {output_dir}")
    if summary.get("checkpoint"):
        line += (f" (from {summary['checkpoint']}"
                 + (", its stored model/moe/router config" if summary["config_from_checkpoint"] else "")
                 + f"; read {summary['bytes_read'] / 1e6:.1f} MB"
                 + (f", {summary['optimizer_bytes_skipped'] / 1e6:.1f} MB of optimizer state left unread"
                    if summary["optimizer_bytes_skipped"] else "") + ")")
    return line
