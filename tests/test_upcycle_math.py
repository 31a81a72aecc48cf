"""The maths of upcycling, checked against what it predicts (exact where exact)."""
import pytest

from tests.support.multirank import run_on_ranks
from tests.conftest import tiny

pytestmark = pytest.mark.multirank


def test_granular_experts_reproduce_dense_logits(tiny_dense_ckpt):
    """G = 2: 16 experts of half width, top-4, virtual-group routers, fc2 x G: exact. Under
    both layer specs' checkpoint names: the MoE built by megatron-core's local spec, and by the
    same spec without its MoE norm key mapping, which writes the Transformer Engine spec's
    ``pre_mlp_layernorm.weight``; the dense model's keys are the same under both."""
    results = run_on_ranks("tests.workers.upcycle_checks:dense_vs_upcycled", 4, timeout_s=240,
                           overrides=tiny(tiny_dense_ckpt, "moe.granularity=2", "parallel.tp=2",
                                          "parallel.ep=2", "parallel.sp=true"),
                           path=str(tiny_dense_ckpt), namings=("local", "transformer_engine"))
    for naming, r in results[0]["by_naming"].items():
        assert r["keys_naming"] == naming, "megatron-core wrote the other spec's names"
        assert r["max_abs_diff"] <= 1e-4 and r["logit_scale"] > 1.0, (naming, r)
    assert results[0]["by_naming"]["transformer_engine"]["dense_keys_alike"]


def test_granular_without_scaling_is_off_by_exactly_g(tiny_dense_ckpt):
    r = run_on_ranks("tests.workers.math_checks:moe_layer_vs_dense_ffn", 1,
                     overrides=tiny(tiny_dense_ckpt, "moe.granularity=2", "moe.weight_scaling=none"),
                     path=str(tiny_dense_ckpt))[0]
    # Each group's G slices share the group's weight equally: output = FFN(x) / G.
    assert r["rel_diff"] == pytest.approx(0.5, abs=1e-5)


def test_softmax_then_topk_scaling_law(tiny_dense_ckpt):
    """Uniform router (std 0): chosen weights sum to T/E; cube-root scaling restores the scale."""
    common = ["router=softmax_topk", "router.init_std=0.0"]
    scaled = run_on_ranks("tests.workers.math_checks:moe_layer_vs_dense_ffn", 1,
                          overrides=tiny(tiny_dense_ckpt, *common), path=str(tiny_dense_ckpt),
                          input_scale=1e-3)[0]
    unscaled = run_on_ranks("tests.workers.math_checks:moe_layer_vs_dense_ffn", 1,
                            overrides=tiny(tiny_dense_ckpt, *common, "moe.weight_scaling=none"),
                            path=str(tiny_dense_ckpt), input_scale=1e-3)[0]
    factor = (8 / 2) ** (1 / 3)
    for r in (scaled, unscaled):
        assert not any(r["nonfinite"].values()) and not r["zeros_in_dense_fc1"], r
    assert scaled["fc1_ratio"] == pytest.approx(factor, rel=1e-5)
    assert scaled["fc2_ratio"] == pytest.approx(factor, rel=1e-5)
    # Without scaling the output is T/E = 1/4 of the dense FFN's: relative error 3/4.
    assert unscaled["rel_diff"] == pytest.approx(0.75, abs=1e-4)
    # With it, small inputs (SiLU near-linear) recover the dense output to first order.
    assert scaled["rel_diff"] < 0.02


def test_routers_agree_across_ranks_and_are_reproducible(tiny_dense_ckpt):
    overrides = tiny(tiny_dense_ckpt, "parallel.tp=2", "parallel.ep=2", "parallel.sp=true")
    first = run_on_ranks("tests.workers.math_checks:fingerprints", 4, timeout_s=240,
                         overrides=overrides, path=str(tiny_dense_ckpt))
    again = run_on_ranks("tests.workers.math_checks:fingerprints", 4, timeout_s=240,
                         overrides=overrides, path=str(tiny_dense_ckpt))
    other_seed = run_on_ranks("tests.workers.math_checks:fingerprints", 1,
                              overrides=tiny(tiny_dense_ckpt, "seed=7"), path=str(tiny_dense_ckpt))[0]
    routers = [r["routers"] for r in first]
    assert all(r == routers[0] for r in routers), "router weights differ between ranks"
    assert len(set(routers[0].values())) == 4, "every layer needs its own router"
    assert [r["routers"] for r in again] == routers and [r["experts"] for r in again] == [r["experts"] for r in first]
    assert other_seed["routers"] != routers[0]


def test_drop_upcycling_reinitialises_the_same_channels_at_any_layout(tiny_dense_ckpt):
    one = run_on_ranks("tests.workers.math_checks:reinitialised_channels", 1,
                       overrides=tiny(tiny_dense_ckpt, "moe.drop_upcycling_ratio=0.5"),
                       path=str(tiny_dense_ckpt))[0]["channels"]
    assert all(len(c) == 64 for c in one.values()), "r = 0.5 of 128 channels per expert"
    assert len({tuple(c) for c in one.values()}) == 8, "each expert re-initialises its own channels"
    sharded = run_on_ranks("tests.workers.math_checks:reinitialised_channels", 2,
                           overrides=tiny(tiny_dense_ckpt, "moe.drop_upcycling_ratio=0.5", "parallel.tp=2",
                                          "parallel.sp=true"),
                           path=str(tiny_dense_ckpt))
    merged = {e: sorted(sharded[0]["channels"][e] + sharded[1]["channels"][e]) for e in one}
    assert merged == one
