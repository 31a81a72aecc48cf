"""The main job end to end: NeMo's trainer on the online-upcycled MoE, on gloo ranks.

A tiny Llama with SmolLM2's vocabulary and tokenizer trains on the real Wikipedia sample,
so each run takes seconds per step and exercises exactly the path the README's command
takes on the full model (which the slow demo test covers).
"""
import json

import pytest

from nemo_upcycle.testing.multirank import run_on_ranks
from tests.workers.training_checks import losses_by_step, read_metrics, run_and_kill_a_rank, run_training

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def tiny_smollm_vocab(tmp_path_factory, cache_dir):
    """A random tiny dense Llama with SmolLM2's vocabulary, and SmolLM2's tokenizer folder."""
    from nemo_upcycle.checkpoint.embedded import ensure_embedded

    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    path = tmp_path_factory.mktemp("tiny_vocab") / "dense"
    overrides = ["model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}"]
    run_on_ranks("tests.workers.upcycle_checks:save_dense", 1, timeout_s=180, overrides=overrides, path=str(path))
    return path, tokenizer


def _overrides(tiny_smollm_vocab, cache_dir, log_dir, *more):
    path, tokenizer = tiny_smollm_vocab
    return [
        "model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}",
        f"model.tokenizer={tokenizer}", f"cache_dir={cache_dir}", f"log_dir={log_dir}",
        "trainer.seq_length=64", "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
        "trainer.lr=1e-3", "trainer.min_lr=1e-4", "trainer.warmup_steps=1",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.checkpoint_every_n_steps=4",
        *more,
    ]


def _ok(result):
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def test_ep2_training_loss_goes_down_and_everything_is_logged(tiny_smollm_vocab, cache_dir, tmp_path):
    out = _ok(run_training(2, _overrides(tiny_smollm_vocab, cache_dir, tmp_path, "parallel.ep=2", "trainer.max_steps=12")))
    assert "upcycled online" in out
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    for key in ("tokens_per_s", "step_time_s", "lr", "dropped_fraction", "max_load_ratio", "router_entropy"):
        assert key in records[-1], key
    assert (tmp_path / "expert_load_layer0.png").stat().st_size > 10_000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "upcycle" / "checkpoints").glob("*-last"))


def test_tp2_training_runs_with_sequence_parallel(tiny_smollm_vocab, cache_dir, tmp_path):
    _ok(run_training(2, _overrides(tiny_smollm_vocab, cache_dir, tmp_path, "parallel.tp=2", "parallel.sp=true",
                                   "trainer.max_steps=6")))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0] - 0.1, losses


def test_killed_rank_fails_fast_and_relaunch_resumes_bit_exactly(tiny_smollm_vocab, cache_dir, tmp_path):
    steps = ["parallel.ep=2", "trainer.max_steps=8"]
    reference = tmp_path / "uninterrupted"
    _ok(run_training(2, _overrides(tiny_smollm_vocab, cache_dir, reference, *steps)))
    expected = losses_by_step(reference)

    crashed = tmp_path / "crashed"
    overrides = _overrides(tiny_smollm_vocab, cache_dir, crashed, *steps)
    result, seconds_to_fail = run_and_kill_a_rank(2, overrides, crashed / "metrics.jsonl", kill_after_step=6)
    assert result.returncode != 0
    assert seconds_to_fail < 60, f"the job took {seconds_to_fail:.0f}s to fail after a rank was killed"

    out = _ok(run_training(2, overrides))
    assert "resuming from" in out and "upcycled online" not in out, "a resumed job must not upcycle again"
    resumed = losses_by_step(crashed)
    for step in range(5, 9):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_resume_at_a_different_layout(tiny_smollm_vocab, cache_dir, tmp_path):
    """Saved at EP2 on 2 ranks, resumed at EP4 on 4 ranks: the checkpoint reshards and
    training continues where it was (same losses as never stopping, up to reduction order)."""
    reference = tmp_path / "uninterrupted"
    _ok(run_training(2, _overrides(tiny_smollm_vocab, cache_dir, reference, "parallel.ep=2", "trainer.max_steps=6")))
    expected = losses_by_step(reference)
    resumed_dir = tmp_path / "resumed"
    # Same schedule as the reference (cosine over 6 steps), stopped after the step-4 checkpoint.
    crashed, _ = run_and_kill_a_rank(2, _overrides(tiny_smollm_vocab, cache_dir, resumed_dir, "parallel.ep=2",
                                                   "trainer.max_steps=6"), resumed_dir / "metrics.jsonl",
                                     kill_after_step=5)
    assert crashed.returncode != 0
    out = _ok(run_training(4, _overrides(tiny_smollm_vocab, cache_dir, resumed_dir, "parallel.ep=4",
                                         "trainer.max_steps=6")))
    assert "resuming from" in out and "upcycled online" not in out
    after = losses_by_step(resumed_dir)
    assert set(after) == {1, 2, 3, 4, 5, 6}
    for step in (5, 6):
        assert after[step] == pytest.approx(expected[step], rel=2e-3), (step, after[step], expected[step])


def test_capacity_factor_reports_dropped_tokens(tiny_smollm_vocab, cache_dir, tmp_path):
    _ok(run_training(2, _overrides(tiny_smollm_vocab, cache_dir, tmp_path, "parallel.ep=2", "moe.capacity_factor=0.5",
                                   "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=100")))
    records = read_metrics(tmp_path)
    assert all(r["dropped_fraction"] > 0.2 for r in records), [r["dropped_fraction"] for r in records]
