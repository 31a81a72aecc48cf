"""Resuming the training job at another parallel layout than the one that saved it.

Each test runs the job once, uninterrupted, at the saving layout: its losses are the
reference, and its checkpoint after step 4 (kept aside while it trains on) is copied into a
new ``log_dir``, where the same command at another layout resumes it, as a user relaunching
on another allocation would. tests/test_training.py covers EP2 -> EP1; these cover pipeline
parallelism taken away (the plain optimizer) and expert parallelism traded for tensor and
expert-tensor parallelism (the distributed optimizer).

Tolerance: the resumed run computes the same sums in another order (tensor parallelism
all-reduces partial matmuls and norms, pipeline parallelism adds the two stages' squared
gradient norms for clipping), so its fp32 losses may differ in the last bits, which Adam's
m/sqrt(v) can amplify over the resumed steps. Measured here: PP2 -> PP1 bit for bit, EP2 ->
TP2/ETP2 at most 8.7e-8 relative (one fp32 ulp of the loss). The bound, 1e-5 relative, leaves
100x that, and is far below what a wrong resume shows: the loss moves by 2e-3 to 2e-2
(relative) per step, and a run restarted from the upcycled weights is 7e-3 off at step 5.
"""
import pytest

from tests.test_training import _ok, _overrides
from tests.workers.training_checks import losses_by_step, run_keeping_a_checkpoint, run_training

pytestmark = pytest.mark.multirank

RESUMED_STEPS = (5, 6, 7, 8)
REL_TOLERANCE = 1e-5


def _reference_and_checkpoint(tiny_smollm_vocab, cache_dir, tmp_path, nproc, *layout):
    """Run 8 steps at ``layout``; return the losses and a log_dir holding its step-4 checkpoint."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    overrides = _overrides(tiny_smollm_vocab, cache_dir, reference, *layout, "trainer.max_steps=8")
    _ok(run_keeping_a_checkpoint(nproc, overrides, reference, after_step=4, into=resumed))
    return losses_by_step(reference), resumed


def _assert_resumed_like_the_reference(out, log_dir, expected):
    (kept,) = (log_dir / "upcycle" / "checkpoints").glob("*-step=3-*")  # after step 4
    assert f"resuming from {kept}" in out and "upcycled online" not in out, out[-3000:]
    after = losses_by_step(log_dir)
    assert sorted(after) == list(RESUMED_STEPS), after
    for step in RESUMED_STEPS:
        assert after[step] == pytest.approx(expected[step], rel=REL_TOLERANCE), (step, after, expected)
    return after


def test_pp2_checkpoint_resumes_without_pipeline_parallelism(tiny_smollm_vocab, cache_dir, tmp_path):
    """Saved at PP2 (2 ranks, one stage each), resumed at PP1 on 1 rank."""
    expected, resumed = _reference_and_checkpoint(tiny_smollm_vocab, cache_dir, tmp_path, 2, "parallel.pp=2")
    out = _ok(run_training(1, _overrides(tiny_smollm_vocab, cache_dir, resumed, "trainer.max_steps=8")))
    _assert_resumed_like_the_reference(out, resumed, expected)


def test_ep2_checkpoint_resumes_at_tp2_with_expert_tensor_parallelism(tiny_smollm_vocab, cache_dir, tmp_path):
    """Saved at EP2 (each rank 4 whole experts; the distributed optimizer), resumed at TP2
    with EP1/ETP2 and sequence parallelism on 2 ranks (each rank half of all 8 experts)."""
    dist_opt = "trainer.distributed_optimizer=true"
    expected, resumed = _reference_and_checkpoint(tiny_smollm_vocab, cache_dir, tmp_path, 2, "parallel.ep=2", dist_opt)
    tp2 = _overrides(tiny_smollm_vocab, cache_dir, resumed, "parallel.tp=2", "parallel.sp=true", "parallel.ep=1",
                     "parallel.etp=2", dist_opt, "trainer.max_steps=8")
    out = _ok(run_training(2, tp2))
    _assert_resumed_like_the_reference(out, resumed, expected)
