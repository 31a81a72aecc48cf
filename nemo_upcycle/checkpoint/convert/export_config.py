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
    # The Hugging Face architecture to write: auto = the one that computes this configuration
    # exactly (Mixtral, Qwen2-MoE, Qwen3-MoE, Llama/Qwen2/Qwen3 for a dense model), or a name
    # such as qwen2_moe to ask for another exact one.
    architecture: str = "auto"
    # A capacity factor below E/k drops tokens in training; Hugging Face MoE models are
    # dropless. true: export anyway, knowing inference will not drop (README: "Export").
    dropless_inference: bool = False
