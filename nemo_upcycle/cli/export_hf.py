"""nemo-upcycle export_hf checkpoint=<MoE torch_dist ckpt> output_dir=<dir> [model=... moe=... router=...]

Writes a Hugging Face folder that ``transformers.MixtralForCausalLM`` loads with no custom
code (``LlamaForCausalLM`` for ``moe=dense``): config.json whose experts, top-k and router
settings match the configuration, safetensors shards written one tensor at a time, and
the dense model's tokenizer files.

Without ``checkpoint``, the dense model of ``model.dense_checkpoint`` (a torch_dist
checkpoint, a Hugging Face folder, or ``embedded:smollm2_135m``) is upcycled to the
configured ``moe`` on this one process and the step-0 MoE is exported: the offline path
for a Hugging Face MoE to fine-tune elsewhere.

``checkpoint=``, ``output_dir=``, ``overwrite=``, ``dtype=``, ``max_shard_size_gb=``,
``tokenizer=`` and ``progress=`` are shorthands for ``export.<name>=``.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import CONFIG_DIR, user_errors
from nemo_upcycle.config.schema import register_configs

register_configs()

SHORTHANDS = ("checkpoint", "output_dir", "overwrite", "dtype", "max_shard_size_gb", "tokenizer", "progress")


def expand_shorthands(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name = arg.split("=", 1)[0]
        out.append(f"export.{arg}" if "=" in arg and name in SHORTHANDS else arg)
    return out


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def export_main(cfg: DictConfig) -> None:
    from nemo_upcycle.checkpoint.export_job import run_export

    with user_errors():
        summary = run_export(cfg)
    print(
        f"exported {summary['architecture']}: {summary['tensors']} tensors in {summary['shards']} shard(s), "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s -> {cfg.export.output_dir}",
        flush=True,
    )


def main() -> None:
    sys.argv = sys.argv[:1] + expand_shorthands(sys.argv[1:])
    export_main()


if __name__ == "__main__":
    main()
