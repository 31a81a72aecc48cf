"""nemo-upcycle evaluate model=... moe=... [checkpoint=DIR | hf_model=DIR] eval.tasks=[...] eval.num_fewshot=K eval.limit=N

lm-evaluation-harness tasks, offline (MMLU and held-out perplexity by default; see
``nemo_upcycle/evaluation/tasks.py``), on a model:

* default: the dense checkpoint of ``model`` upcycled to ``moe`` at step 0 (``moe=dense``:
  the dense model itself), at the ``parallel`` layout (launch with torchrun for several ranks);
* ``checkpoint=DIR`` (``eval.checkpoint``): a megatron-core torch_dist or NeMo 2 checkpoint of
  that model; a checkpoint of the training job (or its ``log_dir``: the checkpoint a relaunch
  would resume from) brings its own ``model``/``moe``/``router`` configuration and tokenizer,
  so no other option is needed (an override that contradicts them is refused), and loads at
  the ``parallel`` layout of this command, whatever layout it was trained at;
* ``hf_model=DIR`` (``eval.hf_model``): a Hugging Face folder, run by the harness's own ``hf``
  model (e.g. what ``export_hf`` wrote from that checkpoint: the numbers must agree).

Prints the harness's tables, writes ``${log_dir}/eval/results.json`` (the harness's layout) and
``samples_<task>.jsonl``, and ends with ``key=value`` pairs, e.g.
``mmlu_acc=0.2667 mmlu_acc_norm=0.2667 n=285 ppl=33.123456 word_ppl=61.2345``.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import (CONFIG_DIR, is_rank0, launch_world_size, print_rank0, set_up_console, user_errors,
                                     validated)
from nemo_upcycle.config.schema import register_configs

register_configs()

SHORTHANDS = ("checkpoint", "hf_model")


def use_trained_checkpoint(cfg: DictConfig) -> None:
    """``eval.checkpoint`` resolved to one checkpoint; its stored configuration in ``cfg``."""
    from nemo_upcycle.checkpoint.stored_config import apply_stored_job, explicit_overrides
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint

    trained = find_checkpoint(cfg.eval.checkpoint)
    apply_stored_job(cfg, trained, explicit_overrides())
    cfg.eval.checkpoint = str(trained.root)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def evaluate_main(cfg: DictConfig) -> None:
    from pathlib import Path

    from nemo_upcycle.evaluation.runner import evaluate_model, print_report, summary_line, write_results
    from nemo_upcycle.platform.console import log_to_file

    set_up_console(cfg)
    if cfg.eval.checkpoint:
        with user_errors():
            use_trained_checkpoint(cfg)
    with validated(cfg, launch_world_size(), "evaluate"):  # eval.* is checked with the rest of the config
        log_to_file(cfg.log_dir)  # library logs of each rank: ${log_dir}/logs/rank<k>.log
        result = evaluate_model(cfg, verbose=is_rank0())
    if is_rank0():
        print_report(result)
        path = write_results(result, Path(cfg.log_dir) / "eval")
        print(f"results: {path}", flush=True)
    print_rank0(summary_line(result["summary"]))
    if not cfg.eval.hf_model:
        from nemo_upcycle.platform.distributed import teardown_parallel

        teardown_parallel()


def main() -> None:
    from nemo_upcycle.export_hf import expand_shorthands

    sys.argv = sys.argv[:1] + expand_shorthands(sys.argv[1:], "eval", SHORTHANDS, SHORTHANDS)
    evaluate_main()


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
