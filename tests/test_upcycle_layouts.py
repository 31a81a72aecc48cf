"""Online sharded upcycling reproduces the dense model's logits at every layout we claim.

The dense reference is loaded with megatron-core's own dist_checkpointing.load, an
independent path from our reader. Top-k-then-softmax, dropless, G = 1: the maths says the
MoE computes the dense function, so the bound is fp32 rounding (1e-4).
"""
import pytest

from tests.support.multirank import run_on_ranks
from tests.conftest import tiny

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true"],
    "tp1_ep4": ["parallel.ep=4"],
    "tp2_ep2_etp1": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true"],
    "pp2_ep2": ["parallel.pp=2", "parallel.ep=2"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"],
    "every_other_layer_tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true", "moe.layers=every_2"],
}


def _check_each(path, layouts: dict[str, list[str]]):
    """One 4-rank launch upcycles ``path`` at every layout and compares with the dense model."""
    results = run_on_ranks("tests.workers.each_layout:each", 4, timeout_s=120 + 30 * len(layouts),
                           check="tests.workers.upcycle_checks:dense_vs_upcycled",
                           runs={name: {"overrides": tiny(path, *layout), "path": str(path)}
                                 for name, layout in layouts.items()})[0]
    assert sorted(results) == sorted(layouts)
    for name, r in results.items():
        assert r["logit_scale"] > 1.0, (name, "logits too small for the comparison to mean anything")
        assert r["max_abs_diff"] <= 1e-4, (name, r)


def test_upcycled_logits_match_dense_at_every_layout(tiny_dense_ckpt):
    _check_each(tiny_dense_ckpt, LAYOUTS)


@pytest.fixture(scope="module")
def dense_saved_at_tp2(tiny_dense_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("dense_tp2") / "ckpt"
    run_on_ranks("tests.workers.parallel_checks:loss_and_grads", 2,
                 overrides=tiny(tiny_dense_ckpt, "moe=dense", "parallel.tp=2"),
                 path=str(tiny_dense_ckpt), save_to=str(path))
    return path


def test_dense_saved_at_one_layout_upcycles_at_another(dense_saved_at_tp2):
    _check_each(dense_saved_at_tp2, {name: LAYOUTS[name] for name in ("tp1_ep4", "pp2_vpp2")})


def test_each_rank_reads_only_its_slice_and_talks_to_no_one(dense_saved_at_tp2):
    results = run_on_ranks("tests.workers.upcycle_checks:upcycle_traffic", 4, timeout_s=240,
                           overrides=tiny(dense_saved_at_tp2, *LAYOUTS["tp2_ep2"]),
                           path=str(dense_saved_at_tp2))
    for rank, r in enumerate(results):
        assert r["collectives"] == [], f"rank {rank} issued collectives: {r['collectives']}"
        # Every element requested is one this rank holds, and each FFN slice is read once.
        assert r["elements_read"] == r["elements_needed"], (rank, r)
        # The checkpoint was saved at TP2, this layout is TP2: a rank reads its half, not more.
        assert r["bytes_read"] < 0.6 * r["checkpoint_bytes"], (rank, r)
