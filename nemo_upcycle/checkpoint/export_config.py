"""Configuration of ``python -m nemo_upcycle.export_hf`` (the ``export`` key of the job config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ExportConfig:
    # An MoE (or dense) megatron-core torch_dist checkpoint, or a NeMo 2 checkpoint folder
    # (weights/ inside), saved at any layout; null = upcycle model.dense_checkpoint to the
    # configured moe on one rank and export the step-0 model.
    checkpoint: Optional[str] = None
    # The Hugging Face folder to write (config.json, safetensors shards, tokenizer files).
    output_dir: Optional[str] = None
    # Replace an existing output_dir (only once the new folder is complete).
    overwrite: bool = False
    # float32 | bfloat16 | float16; null = the checkpoint's dtype.
    dtype: Optional[str] = None
    # Largest safetensors shard, in GB (1e9 bytes).
    max_shard_size_gb: float = 5.0
    # A tokenizer folder to copy; null = model.tokenizer, the embedded model's, or the
    # dense Hugging Face folder.
    tokenizer: Optional[str] = None
    progress: bool = True
