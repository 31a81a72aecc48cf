"""torchrun --nproc_per_node=N -m nemo_upcycle.train [Hydra overrides]  (or: nemo-upcycle train ...)

Upcycles the dense checkpoint online on the first launch, then trains the MoE with NeMo's
trainer; any later launch of the same command resumes from the latest complete MoE
checkpoint in ``log_dir`` and never upcycles again. ``--cfg job`` prints the composed
configuration; ``--help`` lists the config groups and their options.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import CONFIG_DIR, fail, is_rank0, launch_world_size, print_rank0, validated
from nemo_upcycle.config.schema import register_configs

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with validated(cfg, launch_world_size()):
        from nemo_upcycle.training.preflight import check_before_training

        check_before_training(cfg)  # log_dir writable, disk for the checkpoints: before any weight is read
        from nemo_upcycle.training.guards import TrainingStopped
        from nemo_upcycle.training.job import run_training

        try:
            summary = run_training(cfg)
        except TrainingStopped as err:
            report_stop(err)
    print_rank0(f"training finished: {summary}")


def report_stop(err) -> None:
    """A guard stopped training (nemo_upcycle/training/guards.py): its message, exit status 3."""
    from nemo_upcycle.training.guards import EXIT_CODE

    if err.every_rank or is_rank0():
        print(f"error: {err}", file=sys.stderr, flush=True)
    fail(EXIT_CODE)


if __name__ == "__main__":
    main()
