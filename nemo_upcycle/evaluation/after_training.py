"""Evaluate the model a training job has just trained, in the training processes.

``eval.after_training=true`` makes ``python -m nemo_upcycle.train`` run the ``eval.tasks``
(lm-evaluation-harness) on the megatron chunks still in memory after the last step, at the
training layout. It saves a checkpoint round trip (an E8T2 SmolLM2 checkpoint with Adam states is
8.4 GB) and is how the ablation runner evaluates each run of its grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.platform.launcher_env import is_rank0, print_rank0


def evaluate_trained_model(cfg: Any, lightning_module, tokenizer_path: Optional[Path], loggers: list, step: int) -> dict:
    """Score the trained chunks; rank 0 writes ``${log_dir}/eval/results.json`` and logs the
    summary (``eval/mmlu_acc``, ``eval/ppl``, ...) to the trainer's loggers (TensorBoard) at ``step``."""
    from nemo_upcycle.evaluation.backends import MegatronBackend
    from nemo_upcycle.evaluation.harness import MegatronLM, load_tokenizer_for
    from nemo_upcycle.evaluation.runner import evaluate_lm, print_report, summary_line, write_results
    from nemo_upcycle.training.callbacks import mcore_chunks

    # NeMo sizes the model for trainer.seq_length; rotary positions are computed per call, so
    # evaluation may use the dense model's full context like the standalone evaluator does.
    backend = MegatronBackend(mcore_chunks(lightning_module), cfg.model.vocab_size,
                              max_length=cfg.model.max_position_embeddings)
    tokenizer = load_tokenizer_for(tokenizer_path, cfg.model.vocab_size)
    lm = MegatronLM(backend, tokenizer, cfg.eval.batch_size, show_progress=is_rank0())
    result = evaluate_lm(lm, cfg, verbose=is_rank0())
    result["model"] = {"backend": "megatron-core", "trained_steps": step, "model": cfg.model.name,
                       "moe": cfg.moe.name, "router": cfg.router.type, "log_dir": str(cfg.log_dir)}
    if is_rank0():
        print_report(result)
        write_results(result, Path(cfg.log_dir) / "eval")
        scalars = {f"eval/{k}": v for k, v in result["summary"].items() if k != "n" and v == v}  # skip NaN
        for logger in loggers:
            logger.log_metrics(scalars, step=step)
            logger.save()
    print_rank0(summary_line(result["summary"]))
    return result
