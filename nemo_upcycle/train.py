"""torchrun --nproc_per_node=N -m nemo_upcycle.train [Hydra overrides]

Upcycles the dense checkpoint online on the first launch, then trains the MoE with NeMo's
trainer; any later launch of the same command resumes from the latest complete MoE
checkpoint in ``log_dir`` and never upcycles again. ``--cfg job`` prints the composed
configuration; ``--help`` lists the config groups and their options.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli import CONFIG_DIR, launch_world_size, print_rank0, validated
from nemo_upcycle.config.schema import register_configs

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with validated(cfg, launch_world_size()):
        from nemo_upcycle.nemo.job import run_training

        summary = run_training(cfg)
    print_rank0(f"training finished: {summary}")


if __name__ == "__main__":
    main()
