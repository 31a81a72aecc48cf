"""Evaluation of one model through lm-evaluation-harness: build the model, run the tasks, report.

``evaluate_model(cfg)`` is what ``python -m nemo_upcycle.evaluate`` and the ablation runner
call; ``evaluate_lm(lm, cfg)`` scores a model already in memory (the megatron chunks
right after training: ``MegatronLM(MegatronBackend(chunks, vocab_size), ...)``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.evaluation.tasks import HELDOUT_TASK
from nemo_upcycle.errors import UpcycleError


def tokenizer_for(cfg: Any) -> Optional[Path]:
    """The tokenizer folder: model.tokenizer, else the HF model's own, else the dense model's."""
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder

    # None: byte-level vocabulary (the tiny test models).
    return tokenizer_folder(cfg, also_look_in=[cfg.eval.hf_model])


def build_lm(cfg: Any, tokenizer, verbose: bool) -> tuple[Any, dict]:
    """The harness model ``cfg.eval`` asks for, and a description of the model it holds.

    For megatron-core the parallel state is set up here (setup_parallel is idempotent for
    the process group).
    """
    from nemo_upcycle.evaluation.harness import MegatronLM, hf_lm

    if cfg.eval.hf_model:
        folder = Path(cfg.eval.hf_model)
        if not (folder / "config.json").is_file():
            raise UpcycleError(f"eval.hf_model={folder} is not a Hugging Face model folder (no config.json)")
        return hf_lm(folder, tokenizer, cfg.eval.batch_size), {"backend": "lm-eval hf", "hf_model": str(folder)}

    from nemo_upcycle.evaluation.backends import MegatronBackend, load_checkpoint
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.platform.launcher_env import read_launch_env
    from nemo_upcycle.util.ports import single_process_rendezvous

    if read_launch_env().launcher == "single":
        single_process_rendezvous()  # a fixed port would collide with other runs
    par = cfg.parallel
    layout = {k: getattr(par, k) for k in ("tp", "pp", "vpp", "ep", "etp", "sp", "cp")}
    if cfg.eval.checkpoint:
        setup_parallel(cfg.parallel, cfg.seed)
        chunks = build_model_chunks(cfg)
        prefix = load_checkpoint(chunks, cfg.eval.checkpoint)
        described = {"backend": "megatron-core", "checkpoint": str(cfg.eval.checkpoint), "key_prefix": prefix}
    else:
        from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
        from nemo_upcycle.upcycle.engine import upcycle_from_dense

        source = open_dense_source(cfg)
        setup_parallel(cfg.parallel, cfg.seed)
        chunks = build_model_chunks(cfg)
        upcycle_from_dense(chunks, cfg, source)
        described = {"backend": "megatron-core", "dense_checkpoint": str(cfg.model.dense_checkpoint),
                     "upcycled_step0": cfg.moe.num_experts > 0}
    described.update(model=cfg.model.name, moe=cfg.moe.name, router=cfg.router.type, layout=layout)
    backend = MegatronBackend(chunks, cfg.model.vocab_size)
    return MegatronLM(backend, tokenizer, cfg.eval.batch_size, verbose), described


def leaf_tasks(result: dict, name: str) -> list[str]:
    """The tasks a task or group name stands for, in the harness's result."""
    subtasks = result.get("group_subtasks", {})
    if name not in subtasks:
        return [name]
    return [leaf for child in subtasks[name] for leaf in leaf_tasks(result, child)]


def summarize(result: dict, tasks: list[str]) -> dict:
    """Per task named in ``eval.tasks``: ``<task>_acc`` and ``<task>_acc_norm`` (groups:
    aggregated as the harness does), ``n`` (questions scored in all) and, for held-out text,
    ``ppl`` (per token) and ``word_ppl``."""
    summary: dict = {}
    n = 0
    for name in tasks:
        if name == HELDOUT_TASK:
            scores = result["results"][HELDOUT_TASK]
            summary.update(ppl=float(scores["token_perplexity"]), word_ppl=float(scores["word_perplexity,none"]))
            continue
        scores = result.get("groups", {}).get(name) or result["results"][name]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in scores:
                summary[f"{name}_{metric}"] = float(scores[f"{metric},none"])
        n += int(sum(result["n-samples"][leaf]["effective"] for leaf in leaf_tasks(result, name)))
    summary["n"] = n
    return summary


def evaluate_lm(lm, cfg: Any, verbose: bool) -> dict:
    """The harness's result for ``cfg.eval.tasks`` plus ``summary`` and ``eval`` (every rank)."""
    from omegaconf import OmegaConf

    from nemo_upcycle.evaluation.harness import run_harness

    result = run_harness(lm, cfg.eval, verbose)
    result["summary"] = summarize(result, list(cfg.eval.tasks))
    result["eval"] = OmegaConf.to_container(cfg.eval, resolve=True) if OmegaConf.is_config(cfg.eval) else dict(cfg.eval)
    return result


def evaluate_model(cfg: Any, verbose: bool = False) -> dict:
    """Evaluate the model ``cfg`` describes (see :class:`nemo_upcycle.evaluation.config.EvalConfig`).

    Under torchrun every rank must call it; every rank returns the same dict: the harness's
    (``results``, ``groups``, ``n-samples``, ``configs``, ``samples``, ...) with ``summary``,
    ``model`` and ``eval``.
    """
    from nemo_upcycle.evaluation.harness import load_tokenizer_for

    folder = tokenizer_for(cfg)
    tokenizer = load_tokenizer_for(folder, cfg.model.vocab_size)
    lm, described = build_lm(cfg, tokenizer, verbose)
    result = evaluate_lm(lm, cfg, verbose)
    described["tokenizer"] = str(folder) if folder else "utf-8 bytes"
    result["model"] = described
    return result


def summary_line(summary: dict) -> str:
    """The last line, ``key=value`` pairs: accuracies to 4 decimals, perplexities to 6 (an export
    is checked against its checkpoint by comparing the two commands' values, which agree to
    ~1e-6 relative)."""
    def fmt(x: Optional[float], digits: int) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    parts = [f"{k}={fmt(v, 4)}" for k, v in summary.items() if k.endswith(("_acc", "_acc_norm"))]
    parts.append(f"n={summary['n']}")
    parts += [f"{k}={fmt(summary[k], 6)}" for k in ("ppl", "word_ppl") if k in summary]
    return " ".join(parts)


def write_results(result: dict, folder: Path) -> Path:
    """``results.json`` in the harness's layout, without the per-document samples: those go to
    ``samples.jsonl`` beside it, one line per document (the harness's sample record plus its
    ``task``)."""
    import json

    from nemo_upcycle.util.atomic import write_json_atomic, write_text_atomic

    lines = "".join(json.dumps({"task": task, **sample}) + "\n"
                    for task, samples in result.get("samples", {}).items() for sample in samples)
    write_text_atomic(folder / "samples.jsonl", lines)
    return write_json_atomic(folder / "results.json", {k: v for k, v in result.items() if k != "samples"})


def print_report(result: dict) -> None:
    """The harness's own result tables (tasks, then groups)."""
    from lm_eval.utils import make_table

    print(make_table(result), flush=True)
    if "groups" in result and result["groups"]:
        print(make_table(result, "groups"), flush=True)
    heldout = result["results"].get(HELDOUT_TASK)
    if heldout:
        print(f"held-out news ({heldout['tokens']} tokens): token perplexity {heldout['token_perplexity']:.6f}, "
              f"word perplexity {heldout['word_perplexity,none']:.4f}", flush=True)
