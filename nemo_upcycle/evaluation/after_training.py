"""Evaluate the model a training job has just trained, in the training processes.

``eval.after_training=true`` makes ``python -m nemo_upcycle.train`` score MMLU and held-out
perplexity on the megatron chunks still in memory after the last step, at the training
layout. It saves a checkpoint round trip (an E8T2 SmolLM2 checkpoint with Adam states is
8.4 GB) and is how the ablation runner evaluates each run of its grid.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.platform.launcher_env import is_rank0, print_rank0


def evaluate_trained_model(cfg: Any, lightning_module, tokenizer_path: Optional[Path], loggers: list, step: int) -> dict:
    """Score the trained chunks; rank 0 writes ``${log_dir}/eval/results.json`` and logs
    ``eval/mmlu_acc`` and ``eval/ppl`` to the trainer's loggers (TensorBoard) at ``step``."""
    from omegaconf import OmegaConf

    from nemo_upcycle.evaluation.backends import MegatronBackend
    from nemo_upcycle.evaluation.runner import evaluate_backend, print_report, summary_line
    from nemo_upcycle.util.atomic import write_json_atomic
    from nemo_upcycle.training.callbacks import mcore_chunks
    from nemo_upcycle.data.text import encode

    # NeMo sizes the model for trainer.seq_length; rotary positions are computed per call, so
    # evaluation may use the dense model's full context like the standalone evaluator does.
    backend = MegatronBackend(mcore_chunks(lightning_module), cfg.model.vocab_size,
                              max_length=cfg.model.max_position_embeddings)
    encoder = partial(encode, tokenizer_path=tokenizer_path, vocab_size=cfg.model.vocab_size)
    result = evaluate_backend(backend, encoder, cfg.eval, verbose=is_rank0())
    result["model"] = {"backend": "megatron-core", "trained_steps": step, "model": cfg.model.name,
                       "moe": cfg.moe.name, "router": cfg.router.type, "log_dir": str(cfg.log_dir)}
    result["eval"] = OmegaConf.to_container(cfg.eval, resolve=True)
    if is_rank0():
        print_report(result)
        write_json_atomic(Path(cfg.log_dir) / "eval" / "results.json", result)
        scalars = {f"eval/{k}": result[k] for k in ("mmlu_acc", "ppl") if result[k] == result[k]}  # skip NaN
        for logger in loggers:
            logger.log_metrics(scalars, step=step)
            logger.save()
    print_rank0(summary_line(result))
    return result
