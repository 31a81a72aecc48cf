"""nemo-upcycle plan: will this layout fit, and what will it cost?

Takes the training configuration (same Hydra groups and overrides) plus ``world_size=`` or
``nodes=``/``gpus_per_node=``, ``plan.train_tokens=``, ``plan.gpu=``/``plan.peak_tflops=``,
``plan.mfu=`` and ``plan.format=table|json``. Validates the layout with the same function as
training and exits with status 2 and the same message when it cannot run.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import CONFIG_DIR, user_errors
from nemo_upcycle.config.schema import register_configs

register_configs()


def plan_text(cfg) -> str:
    """The plan for ``cfg`` as it would be printed (raises ConfigError for a bad layout)."""
    from nemo_upcycle.planner.report import build_report, render

    return render(build_report(cfg), cfg.plan.format)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors():
        text = plan_text(cfg)
    print(text)


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
