"""MMLU and held-out perplexity of one model: build the back end, score, report.

``evaluate_model(cfg)`` is what ``python -m nemo_upcycle.evaluate`` and the ablation runner
call; ``evaluate_backend(backend, encode, eval_cfg)`` scores a model already in memory
(e.g. megatron chunks right after training: ``MegatronBackend(chunks, vocab_size)``).
"""
from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_upcycle.evaluation.scoring import Backend, Progress, perplexity, scorer_for


def evaluate_backend(backend: Backend, encode: Callable[[str], list[int]], eval_cfg: Any, verbose: bool = False) -> dict:
    """MMLU (unless num_questions == 0) and perplexity (unless max_tokens == 0) of ``backend``.

    Returns ``{"mmlu_acc", "n", "ppl", "mmlu": {...per subject...}, "ppl_detail": {...}, "seconds": {...}}``;
    every rank gets the same dict.
    """
    from nemo_upcycle.data.text import heldout_text
    from nemo_upcycle.evaluation.mmlu import evaluate_mmlu

    m, p = eval_cfg.mmlu, eval_cfg.ppl
    result: dict = {"mmlu_acc": float("nan"), "n": 0, "ppl": float("nan"), "mmlu": None,
                    "ppl_detail": None, "seconds": {}}
    if m.num_questions is None or m.num_questions > 0:
        started = time.perf_counter()
        progress = Progress("mmlu", 0, verbose)
        mmlu = evaluate_mmlu(scorer_for(backend, m.batch_size, progress), encode,
                             m.num_questions, m.shots, m.seed, m.scoring)
        result["seconds"]["mmlu"] = time.perf_counter() - started
        result.update(mmlu_acc=mmlu["acc"], n=mmlu["n"], mmlu=mmlu)
    if p.max_tokens > 0:
        started = time.perf_counter()
        tokens = encode(heldout_text())
        detail = perplexity(backend, tokens, p.seq_length, p.max_tokens, p.batch_size,
                            Progress("ppl", 0, verbose))
        result["seconds"]["ppl"] = time.perf_counter() - started
        result.update(ppl=detail["ppl"], ppl_detail=detail)
    return result


def tokenizer_for(cfg: Any) -> Optional[Path]:
    """The tokenizer folder: model.tokenizer, else the HF model's own, else the dense model's."""
    from nemo_upcycle.checkpoint.tokenizer_files import tokenizer_folder

    # None: byte-level vocabulary (the tiny test models).
    return tokenizer_folder(cfg, also_look_in=[cfg.eval.hf_model])


def build_backend(cfg: Any) -> tuple[Backend, dict]:
    """The back end ``cfg.eval`` asks for, and a description of the model it holds.

    For megatron-core the parallel state is set up here (setup_parallel is idempotent for
    the process group).
    """
    if cfg.eval.hf_model:
        from nemo_upcycle.evaluation.backends import HFBackend

        backend = HFBackend(cfg.eval.hf_model)
        return backend, {"backend": "transformers", "hf_model": str(cfg.eval.hf_model)}

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
        from nemo_upcycle.checkpoint.dense_source import open_dense_source
        from nemo_upcycle.upcycle.engine import upcycle_from_dense

        source = open_dense_source(cfg)
        setup_parallel(cfg.parallel, cfg.seed)
        chunks = build_model_chunks(cfg)
        upcycle_from_dense(chunks, cfg, source)
        described = {"backend": "megatron-core", "dense_checkpoint": str(cfg.model.dense_checkpoint),
                     "upcycled_step0": cfg.moe.num_experts > 0}
    described.update(model=cfg.model.name, moe=cfg.moe.name, router=cfg.router.type, layout=layout)
    return MegatronBackend(chunks, cfg.model.vocab_size), described


def evaluate_model(cfg: Any, verbose: bool = False) -> dict:
    """Evaluate the model ``cfg`` describes (see :class:`nemo_upcycle.evaluation.config.EvalConfig`).

    Under torchrun every rank must call it; every rank returns the same dict:
    ``mmlu_acc`` (overall accuracy), ``n`` (questions), ``ppl``, ``mmlu`` (with per-subject
    ``subjects`` and per-question ``questions``), ``ppl_detail``, ``model``, ``eval``.
    """
    from omegaconf import OmegaConf

    from nemo_upcycle.data.text import encode

    backend, described = build_backend(cfg)
    tokenizer = tokenizer_for(cfg)
    vocab = getattr(backend, "vocab_size", cfg.model.vocab_size)
    result = evaluate_backend(backend, partial(encode, tokenizer_path=tokenizer, vocab_size=vocab), cfg.eval, verbose)
    described["tokenizer"] = str(tokenizer) if tokenizer else "utf-8 bytes"
    result["model"] = described
    result["eval"] = OmegaConf.to_container(cfg.eval, resolve=True) if OmegaConf.is_config(cfg.eval) else dict(cfg.eval)
    return result


def summary_line(result: dict) -> str:
    """The last line. Perplexity to 6 decimals: an export is checked against its checkpoint by
    comparing the two commands' values, which agree to ~1e-6 relative, not just 1e-4."""
    def fmt(x: float, digits: int) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    return f"mmlu_acc={fmt(result['mmlu_acc'], 4)} n={result['n']} ppl={fmt(result['ppl'], 6)}"


def print_report(result: dict, console=None) -> None:
    """Per-subject MMLU table and the totals, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    mmlu = result.get("mmlu")
    if mmlu:
        table = Table(title=f"MMLU {mmlu['shots']}-shot, {mmlu['scoring']} scoring ({mmlu['format']} prompts), "
                            f"{mmlu['n']} questions (seed {mmlu['seed']})")
        for col in ("subject", "n", "correct", "accuracy"):
            table.add_column(col, justify="left" if col == "subject" else "right")
        for subject, s in mmlu["subjects"].items():
            table.add_row(subject, str(s["n"]), str(s["correct"]), f"{100 * s['acc']:.1f}%")
        table.add_section()
        table.add_row("overall (micro)", str(mmlu["n"]), str(mmlu["correct"]), f"{100 * mmlu['acc']:.2f}%")
        table.add_row("mean over subjects", str(len(mmlu["subjects"])), "", f"{100 * mmlu['acc_macro']:.2f}%")
        console.print(table)
    detail = result.get("ppl_detail")
    if detail:
        console.print(f"held-out perplexity (lee_background.cor): {detail['ppl']:.6f} over "
                      f"{detail['tokens_scored']} tokens in {detail['windows']} windows of {detail['seq_length']}")
    if result.get("seconds"):
        console.print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items()))
