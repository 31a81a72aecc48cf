"""A fine-grained MoE with a gated shared expert trains, saves and resumes at another layout.

DeepSeek's shape from E8T2 (``moe=e8t2_g4_shared``: each FFN in 4 slices, the first an
always-on shared expert, 24 routed experts of width F/4, top-6) with the shared expert's
sigmoid gate, on the tiny Llama: 6 steps at TP2/EP2/ETP1 with sequence parallelism (the
distributed optimizer; the shared expert tensor-parallel, its gate replicated over the
sequence-parallel ranks), its checkpoint after step 4 kept aside, then resumed at PP2 without
tensor or expert parallelism (the optimizer's dense + expert chain becomes one optimizer).

Tolerance, as tests/test_resume_layouts.py: step 5 is computed from the restored weights
(1e-5 relative); step 6 after an update whose sums ran in another order (1e-3, below the
1e-2 the loss moves per step). Measured: step 5 bit for bit, step 6 3.0e-5 (a TP2 run resumed
at TP2 itself is no closer from its second step on, dense models included).
"""
import pytest
import torch

from nemo_upcycle.checkpoint.sources.slices import SliceRequest
from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint
from nemo_upcycle.model.megatron_keys import EXPERT_FC1, SHARED_FC1, SHARED_FC2, SHARED_GATE
from tests.workers.training_checks import (
    losses_by_step, read_metrics, run_keeping_a_checkpoint, run_training, tiny_training_overrides,
)

pytestmark = pytest.mark.multirank

SHARED = ["moe=e8t2_g4_shared", "moe.shared_expert.gate=true"]
SAVED_AT = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true",
            "trainer.distributed_optimizer=true"]
RESUMED_AT = ["parallel.pp=2", "trainer.distributed_optimizer=true"]
STEPS, KEPT_AFTER = 6, 4
LAYERS, H, F = 4, 64, 128  # the tiny Llama's


# Global shapes, the same at every layout: the shared expert's fc1 ([gate; up], 2 x F/4 rows),
# fc2 (F/4 wide) and gate (one row), beside 24 routed experts of width F/4.
SHAPES = {SHARED_FC1: (2 * F // 4, H), SHARED_FC2: (H, F // 4), SHARED_GATE: (1, H), EXPERT_FC1: (24, 2 * F // 4, H)}


def _layer_keys(name: str) -> list[str]:
    return [f"module.decoder.layers.{layer}.{name}" for layer in range(LAYERS)]


def _shapes(checkpoint) -> dict[str, tuple]:
    shapes = TorchDistCheckpoint(checkpoint).tensor_shapes()
    return {key: tuple(shapes[key]) if key in shapes else None for name in SHAPES for key in _layer_keys(name)}


def _read(checkpoint, key: str) -> torch.Tensor:
    ckpt = TorchDistCheckpoint(checkpoint)
    out = torch.empty(ckpt.tensor_shapes()[key], dtype=ckpt.metadata.state_dict_metadata[key].properties.dtype)
    ckpt.read([SliceRequest(key, (0,) * out.dim(), out)])
    return out


def _check_router_records(log_dir, steps):
    """Every step logs the routed experts' statistics (dropless: nothing dropped)."""
    records = {r["step"]: r for r in read_metrics(log_dir)}
    assert sorted(records) == list(steps), records
    for r in records.values():
        assert r["dropped_fraction"] == 0.0 and r["max_load_ratio"] >= 1.0 and 0 < r["router_entropy"] <= 1.0, r


def test_gated_shared_expert_trains_at_tp2_ep2_and_resumes_at_pp2(tiny_smollm_vocab, cache_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_keeping_a_checkpoint(2, tiny_training_overrides(tiny_smollm_vocab, cache_dir, straight, *SHARED,
                                                                 *SAVED_AT, f"trainer.max_steps={STEPS}"),
                                      straight, after_step=KEPT_AFTER, into=resumed)
    assert result.returncode == 0, result.stdout[-5000:]
    reference = losses_by_step(straight)
    _check_router_records(straight, range(1, STEPS + 1))

    (kept,) = (resumed / "upcycle" / "checkpoints").glob(f"*-step={KEPT_AFTER - 1}-*")
    expected = {key: shape for name, shape in SHAPES.items() for key in _layer_keys(name)}
    assert _shapes(kept) == expected
    for key in _layer_keys(SHARED_GATE):  # upcycled at zero (sigmoid 1/2), then trained
        assert _read(kept, key).abs().max() > 0, key

    result = run_training(2, tiny_training_overrides(tiny_smollm_vocab, cache_dir, resumed, *SHARED, *RESUMED_AT,
                                                     f"trainer.max_steps={STEPS}"))
    out = result.stdout
    assert result.returncode == 0, out[-5000:]
    assert f"resuming from {kept}" in out and "upcycled online" not in out, out[-5000:]
    after = losses_by_step(resumed)
    print(f"losses: uninterrupted {reference}, resumed at PP2 {after}")
    assert sorted(after) == list(range(KEPT_AFTER + 1, STEPS + 1)), out[-5000:]
    assert after[KEPT_AFTER + 1] == pytest.approx(reference[KEPT_AFTER + 1], rel=1e-5), (after, reference)
    for step in range(KEPT_AFTER + 2, STEPS + 1):
        assert after[step] == pytest.approx(reference[step], rel=1e-3), (step, after, reference)
    _check_router_records(resumed, range(KEPT_AFTER + 1, STEPS + 1))
    # Saved again at PP2 (each stage its layers): the same tensors, whole.
    (last,) = (resumed / "upcycle" / "checkpoints").glob(f"*-step={STEPS - 1}-*")
    assert _shapes(last) == expected
