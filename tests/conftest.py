"""Shared fixtures: tiny dense and MoE checkpoints saved by real megatron-core models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from nemo_upcycle.testing.multirank import run_on_ranks

TINY = ["model=tiny_llama"]
REPO = Path(__file__).resolve().parents[1]


def tiny(path: Path | str, *more: str) -> list[str]:
    return TINY + [f"model.dense_checkpoint={path}", *more]


@pytest.fixture(scope="session")
def tiny_dense_ckpt(tmp_path_factory) -> Path:
    """A random tiny Llama saved as a torch_dist checkpoint at TP1."""
    path = tmp_path_factory.mktemp("dense") / "ckpt"
    run_on_ranks("tests.workers.upcycle_checks:save_dense", 1, timeout_s=180, overrides=tiny(path), path=str(path))
    return path


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tiny_dense_ckpt, tmp_path_factory) -> Path:
    """The tiny dense model upcycled to E8T2 with expert noise, saved as an MoE checkpoint."""
    path = tmp_path_factory.mktemp("moe") / "ckpt"
    run_on_ranks(
        "tests.workers.parallel_checks:save_moe_from_dense", 1, timeout_s=180,
        overrides=tiny(tiny_dense_ckpt), dense_path=str(tiny_dense_ckpt), moe_path=str(path),
    )
    return path


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the embedded SmolLM2 import and tokenized data are cached between runs."""
    path = Path(os.environ.get("NEMO_UPCYCLE_CACHE", Path.home() / ".cache" / "nemo_upcycle"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_smollm_vocab(tmp_path_factory, cache_dir):
    """A random tiny dense Llama with SmolLM2's vocabulary, and SmolLM2's tokenizer folder."""
    from nemo_upcycle.checkpoint.embedded import ensure_embedded

    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    path = tmp_path_factory.mktemp("tiny_vocab") / "dense"
    overrides = ["model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}"]
    run_on_ranks("tests.workers.upcycle_checks:save_dense", 1, timeout_s=180, overrides=overrides, path=str(path))
    return path, tokenizer


@pytest.fixture(scope="session")
def tiny_hf_smollm_vocab(tmp_path_factory, cache_dir) -> Path:
    """A Llama 3.1-style Hugging Face folder as users hold it: written by transformers (RoPE
    scaling on, SmolLM2's vocabulary) with SmolLM2's tokenizer files beside the weights."""
    import shutil

    from nemo_upcycle.checkpoint.embedded import ensure_embedded
    from nemo_upcycle.checkpoint.tokenizer_files import tokenizer_files
    from nemo_upcycle.testing.tiny_hf import write_tiny_hf

    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    folder = write_tiny_hf("llama31", tmp_path_factory.mktemp("tiny_hf") / "Tiny-Llama-3.1", vocab_size=49152)
    for f in tokenizer_files(tokenizer):
        shutil.copy(f, folder / f.name)
    return folder


# The layouts of the shared reference runs (tests/workers/training_checks.ReferenceRun), with
# the distributed optimizer where expert parallel (what trainer=paper sets): its save,
# bit-exact resume, resharding and export are covered by the tests using them. The TP2/EP2/
# ETP1 run, exported only, trains granular experts (G=2: 16 of half width, top-4).
EP2_DISTOPT = ["parallel.ep=2", "trainer.distributed_optimizer=true"]
TP2_EP2_DISTOPT = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true",
                   "trainer.distributed_optimizer=true", "moe.granularity=2"]
PP2 = ["parallel.pp=2"]


def _reference_run(name, layout, tiny_smollm_vocab, cache_dir, tmp_path_factory):
    from tests.workers.training_checks import ReferenceRun

    return ReferenceRun(tmp_path_factory.mktemp(name), tiny_smollm_vocab, cache_dir, layout)


@pytest.fixture(scope="session")
def ep2_reference_run(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    return _reference_run("ep2_reference", EP2_DISTOPT, tiny_smollm_vocab, cache_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tp2_ep2_reference_run(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    return _reference_run("tp2_ep2_reference", TP2_EP2_DISTOPT, tiny_smollm_vocab, cache_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def pp2_reference_run(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    return _reference_run("pp2_reference", PP2, tiny_smollm_vocab, cache_dir, tmp_path_factory)
