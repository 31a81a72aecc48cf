"""torchrun --nproc_per_node=N -m nemo_upcycle.train [Hydra overrides]  (or: nemo-upcycle train ...)

Upcycles the dense checkpoint online on the first launch, then trains the MoE with NeMo's
trainer; any later launch of the same command resumes from the latest complete MoE
checkpoint in ``log_dir`` and never upcycles again. ``--cfg job`` prints the composed
configuration; ``--help`` lists the config groups and their options.

The console shows the project's messages once (rank 0: upcycling, the step lines,
checkpoints, the summary) and any error; NeMo's, megatron's and Lightning's logs of each rank
go to ``${log_dir}/logs/rank<k>.log``; ``verbose=true`` prints them on the console as well.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import (CONFIG_DIR, fail, is_rank0, launch_world_size, print_rank0, set_up_console,
                                     validated)
from nemo_upcycle.config.schema import register_configs

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_upcycle.platform.console import log_to_file

    set_up_console(cfg)  # library logs go to ${log_dir}/logs/rank<k>.log once log_dir is checked
    with validated(cfg, launch_world_size()):
        from nemo_upcycle.training.preflight import check_before_training

        check_before_training(cfg)  # log_dir writable, disk for the checkpoints: before any weight is read
        log_file = log_to_file(cfg.log_dir)  # only now: a rejected command leaves no file behind
        from nemo_upcycle.training.guards import TrainingStopped
        from nemo_upcycle.training.job import run_training
        from nemo_upcycle.training.preemption import TrainingPreempted

        try:
            summary = run_training(cfg)
        except TrainingStopped as err:
            report_stop(err)
        except TrainingPreempted as err:
            report_preemption(err)
    from nemo_upcycle.training.job import finished_line

    print_rank0(finished_line(summary, log_file))


def report_stop(err) -> None:
    """A guard stopped training (nemo_upcycle/training/guards.py): its message, exit status 3."""
    from nemo_upcycle.training.guards import EXIT_CODE

    if err.every_rank or is_rank0():
        print(f"error: {err}", file=sys.stderr, flush=True)
    fail(EXIT_CODE)


def report_preemption(err) -> None:
    """Stopped on SIGUSR1/SIGTERM (nemo_upcycle/training/preemption.py): exit status 75 once
    the checkpoint is complete. Every rank leaves together, after all are through Lightning's
    teardown: under ``srun --kill-on-bad-exit`` a rank still tearing down would be killed and
    srun would report the kill's status instead of 75."""
    import torch.distributed as dist

    from nemo_upcycle.training.preemption import EXIT_CODE

    if dist.is_initialized():
        dist.barrier()
    if is_rank0():
        print(f"{'stopped' if err.saved else 'error'}: {err}", file=sys.stderr, flush=True)
    fail(EXIT_CODE if err.saved else 1)


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
