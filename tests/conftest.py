"""Shared fixtures: tiny dense and MoE checkpoints saved by real megatron-core models.

The suite runs on two pytest-xdist workers (scripts/run_tests.sh); the costly session
fixtures are built once per run by whichever worker asks first (:func:`built_once`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from tests.support.multirank import run_on_ranks

TINY = ["model=tiny_llama"]
REPO = Path(__file__).resolve().parents[1]


def tiny(path: Path | str, *more: str) -> list[str]:
    return TINY + [f"model.dense_checkpoint={path}", *more]


def _shared_root(tmp_path_factory) -> Path:
    """This run's temporary folder common to all pytest-xdist workers (each has one below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``name``'s folder, built by ``build(folder)`` once per test run: the first pytest-xdist
    worker to ask builds it under a file lock, the other waits and gets the same folder (one
    process without xdist builds it as before). A build that raised is retried by the next asker."""
    root = _shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_dense_ckpt(tmp_path_factory) -> Path:
    """A random tiny Llama saved as a torch_dist checkpoint at TP1."""
    def save(folder: Path) -> None:
        run_on_ranks("tests.workers.upcycle_checks:save_dense", 1, timeout_s=180, overrides=tiny(folder / "ckpt"),
                     path=str(folder / "ckpt"))

    return built_once(tmp_path_factory, "dense", save) / "ckpt"


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tiny_dense_ckpt, tmp_path_factory) -> Path:
    """The tiny dense model upcycled to E8T2 with expert noise, saved as an MoE checkpoint."""
    def save(folder: Path) -> None:
        run_on_ranks("tests.workers.parallel_checks:save_moe_from_dense", 1, timeout_s=180,
                     overrides=tiny(tiny_dense_ckpt), dense_path=str(tiny_dense_ckpt), moe_path=str(folder / "ckpt"))

    return built_once(tmp_path_factory, "moe", save) / "ckpt"


@pytest.fixture(scope="session")
def first_run(cache_dir, tmp_path_factory) -> dict:
    """The README's main command as the first command on a fresh machine: its output, exit
    status and wall time, when this run's cache_dir had no embedded import (else {}; tests/test_first_run.py)."""
    record = _shared_root(tmp_path_factory) / "cache_filled" / "first_run.json"
    return json.loads(record.read_text()) if record.exists() else {}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where the embedded SmolLM2 import and tokenized data are cached: NEMO_UPCYCLE_CACHE
    (scripts/run_tests.sh makes it a new, empty folder on every run), else ~/.cache/nemo_upcycle.

    A cache without the embedded import is filled the way a new user's first command fills it:
    the README's main command under torchrun (2 ranks, 2 tiny steps), which imports the embedded
    model and tokenizes the data on its rank 0; tests/test_first_run.py checks how that run went.
    """
    from tests.workers.training_checks import run_readme_main_command

    from nemo_upcycle.checkpoint.sources.embedded import embedded_root

    path = Path(os.environ.get("NEMO_UPCYCLE_CACHE", Path.home() / ".cache" / "nemo_upcycle"))
    path.mkdir(parents=True, exist_ok=True)

    def fill(folder: Path) -> None:
        # Not yet imported is what makes the first run (tests that never need the embedded model,
        # e.g. evaluate's tiny ones on the other worker, may already have cached files of their own).
        if not embedded_root(path, "smollm2_135m").exists():
            run = run_readme_main_command(path, folder / "run")
            (folder / "first_run.json").write_text(json.dumps(run))

    built_once(tmp_path_factory, "cache_filled", fill)
    return path


@pytest.fixture(scope="session")
def tiny_smollm_vocab(tmp_path_factory, cache_dir):
    """A random tiny dense Llama with SmolLM2's vocabulary, and SmolLM2's tokenizer folder."""
    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]

    def save(folder: Path) -> None:
        path = folder / "dense"
        overrides = ["model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}"]
        run_on_ranks("tests.workers.upcycle_checks:save_dense", 1, timeout_s=180, overrides=overrides, path=str(path))

    return built_once(tmp_path_factory, "tiny_vocab", save) / "dense", tokenizer


@pytest.fixture(scope="session")
def tiny_hf_smollm_vocab(tmp_path_factory, cache_dir) -> Path:
    """A Llama 3.1-style Hugging Face folder as users hold it: written by transformers in bf16
    (as Llama 3 ships; RoPE scaling on, SmolLM2's vocabulary) with SmolLM2's tokenizer files
    beside the weights."""
    import shutil

    import torch

    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_files
    from tests.support.tiny_hf import write_tiny_hf

    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    folder = write_tiny_hf("llama31", tmp_path_factory.mktemp("tiny_hf") / "Tiny-Llama-3.1", vocab_size=49152,
                           dtype=torch.bfloat16)
    for f in tokenizer_files(tokenizer):
        shutil.copy(f, folder / f.name)
    return folder


# The layouts of the shared reference runs (tests/workers/training_checks.ReferenceRun), with
# the distributed optimizer where expert parallel (what trainer=paper sets): its save,
# bit-exact resume, resharding and export are covered by the tests using them. The TP2/EP2/
# ETP1 run, exported only, trains granular experts (G=2: 16 of half width, top-4). Two train
# with activation recomputation: PP2 recomputes whole layers (its losses are what the PP1
# resume without recomputation must reproduce: tests/test_resume_layouts.py), TP2/EP2/ETP1
# the selective modules that run on CPU (test_export_trained.py checks the configuration).
EP2_DISTOPT = ["parallel.ep=2", "trainer.distributed_optimizer=true"]
TP2_EP2_DISTOPT = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true",
                   "trainer.distributed_optimizer=true", "moe.granularity=2",
                   "trainer.recompute=selective", "trainer.recompute_modules=[core_attn,layernorm,moe]"]
PP2 = ["parallel.pp=2", "trainer.recompute=full"]


def _reference_run(name, layout, tiny_smollm_vocab, cache_dir, tmp_path_factory):
    from tests.workers.training_checks import ReferenceRun

    root = built_once(tmp_path_factory, name,
                      lambda folder: ReferenceRun.train(folder, tiny_smollm_vocab, cache_dir, layout))
    return ReferenceRun(root, tiny_smollm_vocab[1], layout)


@pytest.fixture(scope="session")
def ep2_reference_run(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    return _reference_run("ep2_reference", EP2_DISTOPT, tiny_smollm_vocab, cache_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tp2_ep2_reference_run(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    return _reference_run("tp2_ep2_reference", TP2_EP2_DISTOPT, tiny_smollm_vocab, cache_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def pp2_reference_run(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    return _reference_run("pp2_reference", PP2, tiny_smollm_vocab, cache_dir, tmp_path_factory)


def write_news_jsonl(path: Path, documents: slice = slice(None), field: str = "body") -> list[str]:
    """gensim's Lee news corpus (one article a line) as JSONL, its text under ``field``; returns the texts."""
    from nemo_upcycle.data.assets import heldout_news_text

    texts = [t for t in heldout_news_text().read_text(encoding="utf-8").splitlines() if t.strip()][documents]
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)))
    return texts


@pytest.fixture(scope="session")
def prepared_news(tmp_path_factory, cache_dir) -> dict:
    """``nemo-upcycle prepare_data`` (2 worker processes) on the news JSONL with SmolLM2's tokenizer:
    the .bin/.idx prefix a training job takes as data.paths, the file, its texts and the command's output."""
    import subprocess
    import sys

    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]

    def prepare(root: Path) -> None:
        write_news_jsonl(root / "news.jsonl")
        cmd = [sys.executable, "-m", "nemo_upcycle.prepare_data", f"data.jsonl={root / 'news.jsonl'}",
               "data.text_field=body", f"data.output_prefix={root / 'news'}", f"model.tokenizer={tokenizer}",
               "data.workers=2"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stderr[-3000:]
        (root / "stdout.txt").write_text(out.stdout)

    root = built_once(tmp_path_factory, "prepared_news", prepare)
    texts = [json.loads(line)["body"] for line in (root / "news.jsonl").read_text().splitlines()]
    return {"prefix": root / "news_body_document", "jsonl": root / "news.jsonl", "texts": texts,
            "tokenizer": tokenizer, "stdout": (root / "stdout.txt").read_text()}
