"""nemo-upcycle import_dense source=<HF folder | file.gguf | embedded:smollm2_135m> output_dir=<dir>

Imports a Llama-architecture model into a megatron-core distributed checkpoint, one
tensor at a time: a dense Llama (HF safetensors folder, sharded or not, or a GGUF file)
becomes a dense checkpoint, a Mixtral folder an MoE checkpoint. ``dtype=float32|bfloat16|
float16`` converts the weights (default: as stored; float32 for GGUF). An existing
``output_dir`` is replaced only with ``overwrite=true``, and only once the new checkpoint
is complete.
"""
from __future__ import annotations

from pathlib import Path

import hydra

from nemo_upcycle.cli.common import CONFIG_DIR, user_errors
from nemo_upcycle.config.schema import ImportConfig, register_configs

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="import_dense", version_base=None)
def main(cfg: ImportConfig) -> None:
    from nemo_upcycle.checkpoint.convert.importer import run_import, summary_line

    with user_errors():
        summary = run_import(cfg.source, Path(cfg.output_dir), cfg.cache_dir, cfg.overwrite, cfg.dtype, cfg.progress)
    print(summary_line(summary, cfg.output_dir), flush=True)


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
