"""torchrun --nproc_per_node=N -m nemo_upcycle.verify model=... moe=... router=... parallel.*=...

Runs the dense model and the online-upcycled MoE model at the requested layout on the same
real tokens, prints per-layer router statistics, and ends with
``max_abs_logit_diff=<v> mean_abs_logit_diff=<v>``. When the dense checkpoint is (or was
imported from) a Hugging Face folder, the dense model is also run in transformers on the
same tokens (``import_max_abs_logit_diff=<v>``): a setting read wrongly from the checkpoint
shows there, where dense-vs-MoE cannot see it. Exits 1 when a difference exceeds its
tolerance (see nemo_upcycle.upcycle.exactness); ``verify.seq_length``, ``verify.batch``,
``verify.transformers=false`` change the check. ``verify.seq_length`` is rounded down (with a
message) to a multiple the layout allows: tp under sequence parallelism.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import CONFIG_DIR, fail, launch_world_size, print_rank0, set_up_console, validated
from nemo_upcycle.config.schema import register_configs

register_configs()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_upcycle.upcycle.step0_check import run_verify, verdict

    set_up_console(cfg)  # verify writes no files: library chatter is shown only with verbose=true
    with validated(cfg, launch_world_size(), "verify"):
        lines, failed = verdict(run_verify(cfg))
    for line in lines:
        print_rank0(line)
    if failed:
        fail(1)
    from nemo_upcycle.platform.distributed import teardown_parallel

    teardown_parallel()


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
