"""Shared-expert and fine-grained+shared upcycling is exact at step 0 (issue 28).

The maths (nemo_upcycle/upcycle/spec.py): the dense FFN is a sum over its intermediate
neurons, so a shared copy carrying alpha of the output plus routed copies carrying 1 - alpha,
or S shared slices plus G - S routed slices per group, are the dense FFN at step 0. Checked
three ways: the arithmetic by hand, the plan's slices against ``torch.chunk`` of the dense
tensors, and ``verify`` at every layout family the project claims (TP, EP, ETP != TP, PP, VPP,
partial MoE layers, bf16) with the upcycled model's logits compared against transformers'
dense model, the independent side.
"""
from __future__ import annotations

import pytest
import torch

from nemo_upcycle.config.compose import compose_config
from nemo_upcycle.config.validate import collect_problems
from nemo_upcycle.upcycle.local_model import ChunkDescription, LocalExpert, MoeFfn, Param, RankCoordinates, SharedExpert
from nemo_upcycle.upcycle.plan import plan_upcycle
from nemo_upcycle.upcycle.router_init import router_weights
from nemo_upcycle.upcycle.spec import UpcycleSpec
from tests.support.multirank import run_on_ranks

H, F = 4, 8  # hidden and dense FFN width of the hand-made plans


def _cfg(*overrides: str):
    return compose_config(["model=tiny_llama", "model.dense_checkpoint=unused", "moe=e8t2", *overrides])


# The arithmetic ----------------------------------------------------------------------------

def test_copy_mode_splits_the_output_between_the_shared_and_the_routed_experts():
    spec = UpcycleSpec.of(_cfg("moe.shared_expert.mode=copy", "moe.shared_expert.alpha=0.25"))
    assert (spec.num_experts, spec.topk, spec.shared_ffn_hidden_size) == (8, 2, 128)
    assert spec.shared_fc2_factor() == 0.25 and spec.scale_factors() == (1.0, 0.75)
    gated = UpcycleSpec.of(_cfg("moe.shared_expert.mode=copy", "moe.shared_expert.alpha=0.25",
                                "moe.shared_expert.gate=true", "moe.granularity=2"))
    # sigmoid(0) = 1/2 on the shared output; a granular group's 2 slices share its weight.
    assert gated.shared_fc2_factor() == 0.5 and gated.scale_factors() == (1.0, 1.5)
    assert (gated.num_experts, gated.topk) == (16, 4)


def test_slices_mode_gives_the_first_slices_to_the_shared_expert_and_routes_the_rest_in_groups():
    spec = UpcycleSpec.of(_cfg("moe.granularity=4", "moe.shared_expert.mode=slices", "moe.shared_expert.slices=1"))
    assert (spec.routed_slices, spec.num_experts, spec.topk) == (3, 24, 6)
    assert (spec.expert_ffn_hidden_size, spec.shared_ffn_hidden_size) == (32, 32)
    assert [spec.ffn_slice_of(e) for e in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    assert spec.shared_fc2_factor() == 1.0 and spec.scale_factors() == (1.0, 3.0)
    rows = router_weights(0, 0, spec, 0.02)
    assert rows.shape == (24, 64) and torch.equal(rows[0], rows[2]) and not torch.equal(rows[2], rows[3])


def test_the_split_sums_to_the_dense_ffn():
    """The claim behind both modes, on random weights: shared part + routed parts = FFN."""
    gen = torch.Generator().manual_seed(0)
    w_gate, w_up = (torch.randn(F, H, generator=gen, dtype=torch.float64) for _ in range(2))
    w_down = torch.randn(H, F, generator=gen, dtype=torch.float64)
    x = torch.randn(3, H, generator=gen, dtype=torch.float64)

    def ffn(rows):
        return (torch.nn.functional.silu(x @ w_gate[rows].T) * (x @ w_up[rows].T)) @ w_down[:, rows].T

    dense = ffn(slice(0, F))
    alpha = 0.3
    assert torch.allclose(alpha * dense + (1 - alpha) * dense, dense)
    g, s = 4, 1
    width = F // g
    shared = ffn(slice(0, s * width))
    # Each group's G - S members get weight p_g / (G - S); fc2 x (G - S); the weights p_g sum to 1.
    p = torch.tensor([0.7, 0.3], dtype=torch.float64)
    routed = sum(p[k] / (g - s) * sum((g - s) * ffn(slice(j * width, (j + 1) * width)) for j in range(s, g))
                 for k in range(2))
    assert torch.allclose(shared + routed, dense)


@pytest.mark.parametrize("overrides, message", [
    (["moe.shared_expert.mode=both"], "moe.shared_expert.mode=both must be one of none, copy, slices"),
    (["moe.shared_expert.mode=copy", "moe.shared_expert.alpha=1.0"], "moe.shared_expert.alpha=1.0 must be in (0, 1)"),
    (["moe.shared_expert.mode=slices"], "moe.granularity=1: set moe.granularity>=2"),
    (["moe.shared_expert.mode=slices", "moe.granularity=4", "moe.shared_expert.slices=4"],
     "moe.shared_expert.slices=4 must be between 1 and moe.granularity-1=3"),
    (["moe.shared_expert.gate=true"], "moe.shared_expert.gate=true gates a shared expert, but moe.shared_expert.mode=none"),
    (["moe=dense", "moe.shared_expert.mode=copy"], "moe.shared_expert.mode=copy needs an MoE"),
    (["moe.shared_expert.mode=slices", "moe.granularity=4", "moe.shared_expert.slices=1", "parallel.tp=3"],
     "the shared expert's width 32 is not divisible by parallel.tp=3"),
])
def test_bad_shared_expert_settings_are_refused_by_name(overrides, message):
    problems = collect_problems(_cfg(*overrides), command="verify")
    assert any(message in p for p in problems), problems


# The plan ----------------------------------------------------------------------------------

def test_the_plan_reads_the_shared_slices_at_the_tensor_parallel_rank_and_the_routed_ones_at_the_expert_rank():
    """TP2 rank 1 with ETP1, G = 4, S = 1: the shared expert is neurons [0, 2) of the dense FFN
    (rank 1 holds neuron 1), local routed experts 0 and 1 are slices 1 and 2 (whole)."""
    spec = UpcycleSpec(num_layers=1, hidden_size=H, ffn_hidden_size=F, coarse_experts=2, coarse_topk=1,
                       granularity=4, moe_layers=(0,), router=UpcycleSpec.of(_cfg()).router, weight_scaling="auto",
                       shared_mode="slices", shared_slices=1, shared_gate=True)
    dense = {"decoder.layers.mlp.linear_fc1.weight": torch.arange(2 * F * H, dtype=torch.float32).reshape(1, 2 * F, H),
             "decoder.layers.mlp.linear_fc2.weight": torch.arange(H * F, dtype=torch.float32).reshape(1, H, F)}
    experts = tuple(LocalExpert(e, Param(f"e{e}.fc1", (4, H)), Param(f"e{e}.fc2", (H, 2))) for e in (0, 1))
    shared = SharedExpert(Param("s.fc1", (2, H)), Param("s.fc2", (H, 1)), Param("s.gate", (1, H)))
    chunk = ChunkDescription((), (), (MoeFfn(0, Param("router", (6, H)), experts, shared),))
    plan = plan_upcycle([chunk], RankCoordinates(tp_rank=1, tp_size=2, etp_rank=0, etp_size=1), spec,
                        {k: tuple(v.shape) for k, v in dense.items()})
    fc1, fc2 = dense["decoder.layers.mlp.linear_fc1.weight"][0], dense["decoder.layers.mlp.linear_fc2.weight"][0]
    gate, up = fc1[:F], fc1[F:]

    def delivered(target):
        (entry,) = [e for e in plan.entries if e.target == f"0/{target}"]
        parts = [dense[p.dense.key][tuple(slice(o, o + n) for o, n in zip(p.dense.offsets, p.dense.shape))][0]
                 for p in entry.pieces]
        return entry.kind, torch.cat(parts) if entry.role == "fc1" else parts[0]

    kind, got = delivered("s.fc1")
    assert kind == "shared" and torch.equal(got, torch.cat([gate[1:2], up[1:2]]))
    assert torch.equal(delivered("s.fc2")[1], fc2[:, 1:2])
    for e, first in ((0, 2), (1, 4)):  # slices 1 and 2: neurons [2, 4) and [4, 6)
        kind, got = delivered(f"e{e}.fc1")
        assert kind == "expert" and torch.equal(got, torch.cat([gate[first:first + 2], up[first:first + 2]]))
        assert torch.equal(delivered(f"e{e}.fc2")[1], fc2[:, first:first + 2])
    assert [e.kind for e in plan.entries if e.target == "0/s.gate"] == ["shared_gate"]


# verify at every layout family ---------------------------------------------------------------

COPY_GATED = ["moe.shared_expert.mode=copy", "moe.shared_expert.alpha=0.3", "moe.shared_expert.gate=true"]
SLICES = ["moe.granularity=4", "moe.shared_expert.mode=slices", "moe.shared_expert.slices=1"]
LAYOUTS = {
    "tp2_ep2_sp": ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true"],
    "ep4": ["parallel.ep=4"],
    "tp2_ep2_etp1_sp": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true"],
    "pp2_ep2": ["parallel.pp=2", "parallel.ep=2"],
    "pp2_vpp2_ep2": ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"],
    "tp2_pp2_sp_every_2": ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "moe.layers=every_2"],
}


@pytest.fixture(scope="module")
def wide_tiny_llamas(tmp_path_factory):
    """The tiny Llama as transformers writes it, in fp32 and bf16, with transformers' init widened
    to 0.1 so that its FFNs move the logits (a wrong shared share must show above rounding)."""
    from tests.support.tiny_hf import write_tiny_hf

    root = tmp_path_factory.mktemp("shared")
    common = dict(rope_theta=100000.0, max_position_embeddings=256, initializer_range=0.1)
    return (write_tiny_hf("llama", root / "fp32", **common),
            write_tiny_hf("llama", root / "bf16", dtype=torch.bfloat16, **common))


def test_verify_is_exact_against_transformers_at_every_layout(wide_tiny_llamas):
    """One 4-rank launch: the gated copy and the fine-grained shape at each layout, the other
    variants at one each, a bf16 run, and a wrong shared share that verify must fail."""
    fp32, bf16 = wide_tiny_llamas
    base = ["model=tiny_llama", f"model.dense_checkpoint={fp32}", "moe=e8t2", "router=topk_softmax",
            "verify.seq_length=32", "verify.batch=2"]
    runs = {}
    for name, layout in LAYOUTS.items():
        runs[f"copy+gate {name}"] = {"base": base + COPY_GATED, "layout": layout}
        runs[f"slices {name}"] = {"base": base + SLICES, "layout": layout}
    runs["copy ep4"] = {"base": base + ["moe.shared_expert.mode=copy"], "layout": LAYOUTS["ep4"]}
    runs["slices3+gate tp2_ep2_etp1_sp"] = {
        "base": base + ["moe.granularity=4", "moe.shared_expert.mode=slices", "moe.shared_expert.slices=3",
                        "moe.shared_expert.gate=true"], "layout": LAYOUTS["tp2_ep2_etp1_sp"]}
    bf16_base = [*base[:1], f"model.dense_checkpoint={bf16}", *base[2:], "trainer.precision=bf16"]
    runs["bf16 slices tp2_ep2_sp"] = {"base": bf16_base + SLICES, "layout": LAYOUTS["tp2_ep2_sp"]}
    runs["broken share"] = {"base": base + SLICES, "layout": LAYOUTS["tp2_ep2_sp"], "breakage": "shared_share"}
    results = run_on_ranks("tests.workers.each_layout:each", 4, timeout_s=150 + 15 * len(runs),
                           check="tests.workers.layout_walk:verify_at", runs=runs)[0]
    assert sorted(results) == sorted(runs)
    for name, r in results.items():  # the README's table (pytest -s)
        print(f"| {name} | {r['max']:.2e} | {r['import']['upcycled_max']:.2e} | {r['tolerance']:.2e} |")
    for name, r in results.items():
        imported = r["import"]
        if name == "broken share":
            assert r["failed"] and r["max"] > 2 * r["tolerance"], (name, r)
            assert imported["upcycled_max"] > 2 * r["tolerance"], (name, r)
            continue
        assert not r["failed"] and r["tolerance"] is not None, (name, r["lines"])
        assert r["logit_scale"] > 1.0, (name, "logits too small for the comparison to mean anything")
        # The upcycled model against transformers' dense model, and against ours.
        assert imported["upcycled_max"] <= 2 * r["tolerance"] and r["max"] <= r["tolerance"], (name, r)
        if not name.startswith("bf16"):
            assert imported["upcycled_max"] <= 1e-4, (name, r)
