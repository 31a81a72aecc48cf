"""megatron-core on CPU/gloo: real GPTModels, forward+backward, at the layouts we claim.

Each layout loads the same checkpoint and must give the loss of the single-rank run:
a layout whose collectives or CUDA workarounds were wrong would change the loss.
"""
import pytest

from tests.support.multirank import run_on_ranks
from tests.conftest import tiny

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true"],
    "tp1_ep4": ["parallel.ep=4"],
    "pp2": ["parallel.pp=2"],
    "tp2_ep2_etp1": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"],
}
# The interleaved schedule reaches its steady state (a forward and a backward tensor
# exchanged in one step, where two pipeline stages cross them) only with more micro-batches
# than chunks: 4 of one sequence.
MICRO_BATCH_SIZE = {"pp2_vpp2": 1}


@pytest.fixture(scope="module")
def reference(tiny_dense_ckpt, tiny_moe_ckpt):
    dense = run_on_ranks("tests.workers.parallel_checks:loss_and_grads", 1,
                         overrides=tiny(tiny_dense_ckpt, "moe=dense"), path=str(tiny_dense_ckpt))[0]
    moe = run_on_ranks("tests.workers.parallel_checks:loss_and_grads", 1,
                       overrides=tiny(tiny_dense_ckpt), path=str(tiny_moe_ckpt))[0]
    return {"dense": dense["loss"], "moe": moe["loss"]}


def test_forward_backward_matches_single_rank_at_every_layout(reference, tiny_dense_ckpt, tiny_moe_ckpt):
    """One 4-rank launch: the MoE at every layout, the dense model at two."""
    runs = {f"moe_{name}": {"overrides": tiny(tiny_dense_ckpt, *layout), "path": str(tiny_moe_ckpt),
                            "micro_batch_size": MICRO_BATCH_SIZE.get(name, 2)}
            for name, layout in LAYOUTS.items()}
    for name in ("tp2_ep2", "pp2"):
        dense = [o for o in LAYOUTS[name] if "ep=" not in o] + ["moe=dense"]
        runs[f"dense_{name}"] = {"overrides": tiny(tiny_dense_ckpt, *dense), "path": str(tiny_dense_ckpt)}
    per_rank = run_on_ranks("tests.workers.each_layout:each", 4, timeout_s=120 + 30 * len(runs),
                            check="tests.workers.parallel_checks:loss_and_grads", runs=runs)
    for name in runs:
        for r in (ranks[name] for ranks in per_rank):
            assert r["finite"] and r["grads"] > 0 and r["nonzero_grads"] == r["grads"], (name, r)
        expected = reference["moe" if name.startswith("moe") else "dense"]
        assert per_rank[0][name]["loss"] == pytest.approx(expected, rel=1e-5), name


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_tp2_pp2(tiny_dense_ckpt, tmp_path):
    saved = tmp_path / "tp2"
    at_tp2 = run_on_ranks("tests.workers.parallel_checks:loss_and_grads", 2,
                          overrides=tiny(tiny_dense_ckpt, "moe=dense", "parallel.tp=2"),
                          path=str(tiny_dense_ckpt), save_to=str(saved))[0]["loss"]
    at_tp1 = run_on_ranks("tests.workers.parallel_checks:loss_and_grads", 1,
                          overrides=tiny(tiny_dense_ckpt, "moe=dense"), path=str(saved))[0]["loss"]
    at_tp2_pp2 = run_on_ranks("tests.workers.parallel_checks:loss_and_grads", 4,
                              overrides=tiny(tiny_dense_ckpt, "moe=dense", "parallel.tp=2", "parallel.pp=2"),
                              path=str(saved))[0]["loss"]
    assert at_tp1 == pytest.approx(at_tp2, rel=1e-6)
    assert at_tp2_pp2 == pytest.approx(at_tp2, rel=1e-6)


def test_a_failing_rank_is_reported_not_hung():
    from tests.support.multirank import MultiRankError

    with pytest.raises(MultiRankError, match="rank 1"):
        run_on_ranks("tests.workers.harness_checks:rank1_raises_others_wait", 2, timeout_s=90)
