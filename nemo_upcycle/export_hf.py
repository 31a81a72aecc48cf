"""nemo-upcycle export_hf checkpoint=<trained checkpoint or log_dir> output_dir=<dir>

Writes a Hugging Face folder that ``transformers.MixtralForCausalLM`` loads with no custom
code (``LlamaForCausalLM`` for ``moe=dense``): config.json whose experts, top-k and router
settings match the configuration, safetensors shards written one tensor at a time, and
the tokenizer files with a generation_config.json (the dense model's bos/eos/pad ids).

``checkpoint`` is a checkpoint of the training job (``<name>-last/``, at any layout, with or
without optimizer states, which are never read), or its ``log_dir``: the checkpoint a
relaunch would resume from is exported. The job stored its configuration in the checkpoint,
so ``model``, ``moe`` and ``router`` come from there; an override that contradicts them is
refused (one that agrees is accepted). Any other torch_dist checkpoint (no stored job) is
exported with the ``model``/``moe``/``router`` of the command line.

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
PATHS = ("checkpoint", "output_dir", "tokenizer")


def hydra_quoted(value: str) -> str:
    """A path as one Hydra string: NeMo names checkpoints ``...-step=3-...-last``, and an
    unquoted ``=`` (or space, comma, bracket) in a value is a Hydra syntax error."""
    if not value or value[0] in "'\"" or value == "null":
        return value  # already quoted by the user, or null
    return "'" + value.replace("'", "\\'") + "'"


def expand_shorthands(argv: list[str], section: str = "export", shorthands=SHORTHANDS, paths=PATHS) -> list[str]:
    out = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if not _ or name not in shorthands:
            out.append(arg)
            continue
        out.append(f"{section}.{name}={hydra_quoted(value) if name in paths else value}")
    return out


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def export_main(cfg: DictConfig) -> None:
    from nemo_upcycle.checkpoint.convert.export_job import run_export, summary_line

    with user_errors():
        summary = run_export(cfg)
    print(summary_line(summary, cfg.export.output_dir), flush=True)


def main() -> None:
    sys.argv = sys.argv[:1] + expand_shorthands(sys.argv[1:])
    export_main()


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
