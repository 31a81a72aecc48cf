"""Unit tests of the upcycling core's pure parts: no torchrun, no megatron model, milliseconds.

Expected values come from the maths (slicing dense tensors with ``torch.chunk``, the
scaling formulas, hand-computed offsets), not from the code under test.
"""
from __future__ import annotations

import io
import itertools
import random

import pytest
import torch
from omegaconf import OmegaConf

from nemo_upcycle.checkpoint.sources.slices import narrow_tensor_by_index
from nemo_upcycle.checkpoint.sources.stored_tensor import locate_payload
from nemo_upcycle.checkpoint.sources.torch_dist import _contiguous_span
from nemo_upcycle.config.moe_layers import MoELayerSpecError
from nemo_upcycle.upcycle.dense_keys import DenseKeyResolver
from nemo_upcycle.errors import DenseCheckpointMismatch
from nemo_upcycle.upcycle.exactness import inexact_reason
from nemo_upcycle.upcycle.local_model import (
    ChunkDescription,
    DenseFfn,
    LocalExpert,
    MoeFfn,
    Param,
    RankCoordinates,
    StateTensor,
)
from nemo_upcycle.upcycle.plan import FfnKeys, canonical_name, ffn_pieces, plan_upcycle
from nemo_upcycle.upcycle.router_init import router_weights
from nemo_upcycle.upcycle.routers import ROUTERS, router_row
from nemo_upcycle.upcycle.spec import UpcycleSpec

FC1_KEY = "decoder.layers.mlp.linear_fc1.weight"
FC2_KEY = "decoder.layers.mlp.linear_fc2.weight"


def _spec(router="topk_softmax", experts=4, topk=1, granularity=1, scaling="auto",
          layers=2, hidden=4, ffn=8, moe_layers=(0,)) -> UpcycleSpec:
    return UpcycleSpec(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, coarse_experts=experts,
                       coarse_topk=topk, granularity=granularity, moe_layers=tuple(moe_layers),
                       router=router_row(router), weight_scaling=scaling)


def _cfg(router="topk_softmax", experts=8, topk=2, granularity=1, layers="all", num_layers=6, **moe):
    return OmegaConf.create({
        "model": {"num_layers": num_layers, "hidden_size": 16, "ffn_hidden_size": 32},
        "moe": {"num_experts": experts, "topk": topk, "granularity": granularity, "layers": layers,
                "weight_scaling": "auto", "capacity_factor": None, "expert_noise_std": 0.0,
                "drop_upcycling_ratio": 0.0, **moe},
        "router": {"type": router},
    })


def _deliver(pieces, dense: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """What the engine writes into a target of ``shape`` from these pieces (rows, layer squeeze)."""
    out = torch.full(shape, float("nan"))
    for p in pieces:
        got = narrow_tensor_by_index(dense[p.dense.key], p.dense.offsets, p.dense.shape)
        if p.squeeze_layer:
            got = got.squeeze(0)
        out[p.row:p.row + got.shape[0]] = got
    assert not out.isnan().any(), "the pieces leave part of the target unwritten"
    return out


def _dense_ffn(layers=2, ffn=8, hidden=4):
    fc1 = torch.arange(layers * 2 * ffn * hidden, dtype=torch.float32).reshape(layers, 2 * ffn, hidden)
    fc2 = 10_000 + torch.arange(layers * hidden * ffn, dtype=torch.float32).reshape(layers, hidden, ffn)
    return fc1, fc2


def _expected_shard(fc1, fc2, granularity, ffn_slice, rank, size):
    """Slice ``ffn_slice`` of G of the intermediate dimension, then this rank's 1/size of it."""
    gate, up = fc1.chunk(2, dim=0)
    part = lambda t, dim: t.chunk(granularity, dim=dim)[ffn_slice].chunk(size, dim=dim)[rank]  # noqa: E731
    return torch.cat([part(gate, 0), part(up, 0)]), part(fc2, 1)


# ffn_pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity, tp_size", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2)])
def test_ffn_pieces_take_the_gate_and_up_rows_and_fc2_columns_of_the_slice(granularity, tp_size):
    ffn, hidden, layer = 16, 3, 1
    fc1, fc2 = _dense_ffn(layers=2, ffn=ffn, hidden=hidden)
    dense = {FC1_KEY: fc1, FC2_KEY: fc2}
    keys = FfnKeys(FC1_KEY, FC2_KEY, (layer,), True)
    width = ffn // granularity // tp_size
    for ffn_slice, rank in itertools.product(range(granularity), range(tp_size)):
        p1, p2 = ffn_pieces(keys, ffn_hidden=ffn, hidden=hidden, granularity=granularity,
                            ffn_slice=ffn_slice, tp_rank=rank, tp_size=tp_size)
        want1, want2 = _expected_shard(fc1[layer], fc2[layer], granularity, ffn_slice, rank, tp_size)
        assert torch.equal(_deliver(p1, dense, (2 * width, hidden)), want1), (ffn_slice, rank)
        assert torch.equal(_deliver(p2, dense, (hidden, width)), want2), (ffn_slice, rank)


def test_ffn_pieces_on_per_layer_keys_have_no_layer_axis():
    fc1, fc2 = _dense_ffn(layers=1)
    keys = FfnKeys("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight", (), False)
    p1, p2 = ffn_pieces(keys, ffn_hidden=8, hidden=4, granularity=2, ffn_slice=1, tp_rank=0, tp_size=1)
    assert [(p.dense.offsets, p.dense.shape, p.row, p.squeeze_layer) for p in p1] == [
        ((4, 0), (4, 4), 0, False), ((12, 0), (4, 4), 4, False)]
    assert [(p.dense.offsets, p.dense.shape) for p in p2] == [((0, 4), (4, 4))]


# Dense key resolution ----------------------------------------------------------------------


STACKED = {
    "embedding.word_embeddings.weight": (32, 8),
    "decoder.layers.self_attention.linear_qkv.weight": (4, 24, 8),
    "decoder.final_layernorm.weight": (8,),
}
PER_LAYER = {"embedding.word_embeddings.weight": (32, 8),
             **{f"decoder.layers.{i}.self_attention.linear_qkv.weight": (24, 8) for i in range(3)}}
QKV = "self_attention.linear_qkv.weight"


def test_stacked_keys_resolve_to_a_layer_offset():
    r = DenseKeyResolver(STACKED, num_layers=4)
    assert r.resolve(2, QKV) == ("decoder.layers.self_attention.linear_qkv.weight", (2,), True)
    assert r.dense_shape(2, QKV) == (24, 8)
    assert r.layer_count(QKV) == 4
    assert r.resolve(None, "decoder.final_layernorm.weight") == ("decoder.final_layernorm.weight", (), False)


def test_per_layer_keys_resolve_to_their_own_key():
    r = DenseKeyResolver(PER_LAYER, num_layers=3)
    assert r.resolve(1, QKV) == ("decoder.layers.1.self_attention.linear_qkv.weight", (), False)
    assert r.dense_shape(1, QKV) == (24, 8)
    assert r.layer_count(QKV) == 3


@pytest.mark.parametrize("shapes, stacked", [(STACKED, True), (PER_LAYER, False)])
def test_module_prefix_is_found_and_kept(shapes, stacked):
    r = DenseKeyResolver({"module." + k: v for k, v in shapes.items()}, num_layers=None)
    key, lead, is_stacked = r.resolve(0, QKV)
    assert key.startswith("module.decoder.layers.") and is_stacked == stacked and lead == ((0,) if stacked else ())
    assert r.resolve(None, "embedding.word_embeddings.weight")[0] == "module.embedding.word_embeddings.weight"
    assert r.layer_count(QKV) == (4 if stacked else 3)


def test_key_mismatches_say_what_is_wrong():
    with pytest.raises(DenseCheckpointMismatch, match=r"has 4 layers .* model.num_layers=6"):
        DenseKeyResolver(STACKED, num_layers=6).resolve(0, QKV)
    r = DenseKeyResolver(PER_LAYER, num_layers=3)
    with pytest.raises(DenseCheckpointMismatch, match=r"layer 5 .*decoder\.layers\.5\.self_attention"):
        r.resolve(5, QKV)
    with pytest.raises(DenseCheckpointMismatch, match="output_layer.weight"):
        r.resolve(None, "output_layer.weight")
    with pytest.raises(DenseCheckpointMismatch, match="in any layer"):
        r.layer_count("mlp.linear_fc1.weight")
    assert not r.has(None, "output_layer.weight") and r.has(2, QKV) and not r.has(3, QKV)


# Which part of a stored tensor a request covers ----------------------------------------------


def test_contiguous_span_is_exactly_the_boxes_that_are_one_run_of_memory():
    rng = random.Random(0)
    for _ in range(300):
        sizes = tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3)))
        offsets = tuple(rng.randrange(s) for s in sizes)
        lengths = tuple(rng.randint(1, s - o) for s, o in zip(sizes, offsets))
        flat = narrow_tensor_by_index(torch.arange(torch.Size(sizes).numel()).reshape(sizes), offsets, lengths)
        flat = flat.reshape(-1).tolist()
        is_run = flat == list(range(flat[0], flat[0] + len(flat)))
        span = _contiguous_span(sizes, offsets, lengths)
        assert (span is not None) == is_run, (sizes, offsets, lengths)
        if span is not None:
            assert span == (flat[0], len(flat)), (sizes, offsets, lengths)


def test_narrowing_is_a_view_of_the_box():
    t = torch.arange(60.0).reshape(3, 4, 5)
    view = narrow_tensor_by_index(t, (1, 2, 0), (2, 2, 5))
    assert torch.equal(view, t[1:3, 2:4, 0:5])
    view.zero_()
    assert t[1:3, 2:4].abs().sum() == 0 and t[0].abs().sum() > 0, "not a view"


def _stored(tensor: torch.Tensor, before: bytes = b"x" * 37, after: bytes = b"y" * 11):
    buf = io.BytesIO()
    torch.save(tensor, buf)
    blob = buf.getvalue()
    return io.BytesIO(before + blob + after), len(before), len(blob)


def test_payload_is_located_inside_a_larger_file():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    handle, start, length = _stored(t)
    payload = locate_payload(handle, start, length, t.numel() * 4)
    assert payload is not None and payload.length == 96
    handle.seek(payload.offset)
    raw = bytearray(handle.read(payload.length))
    assert torch.equal(torch.frombuffer(raw, dtype=torch.float32).reshape(4, 6), t)


def test_payload_of_a_view_of_a_larger_storage_is_refused():
    big = torch.arange(100, dtype=torch.float32)
    handle, start, length = _stored(big[:10])  # torch.save writes the whole storage
    assert locate_payload(handle, start, length, 10 * 4) is None
    assert locate_payload(io.BytesIO(b"not a zip archive" * 8), 0, 136, 4) is None


# Scale factors -------------------------------------------------------------------------------


@pytest.mark.parametrize("router, granularity, expected", [
    ("topk_softmax", 1, (1.0, 1.0)),  # weights sum to 1: nothing to restore
    ("topk_softmax", 2, (1.0, 2.0)),  # a group's G slices share its weight: fc2 x G
    ("topk_softmax", 4, (1.0, 4.0)),
    ("aux_free", 2, (1.0, 2.0)),
    ("sinkhorn", 2, (1.0, 1.0)),
])
def test_top_k_then_softmax_scales_fc2_by_granularity(router, granularity, expected):
    assert _spec(router, granularity=granularity).scale_factors() == expected


@pytest.mark.parametrize("experts, topk, granularity", [(8, 2, 1), (8, 2, 2), (16, 4, 1), (4, 1, 4)])
def test_softmax_then_top_k_scales_every_matrix_by_the_cube_root_of_eg_over_t(experts, topk, granularity):
    f1, f2 = _spec("softmax_topk", experts=experts, topk=topk, granularity=granularity).scale_factors()
    # Uniform router: the T·G chosen of E·G weights are 1/(E·G) each, and every dense slice is
    # chosen T times, so the output is T/(E·G) of the FFN's; three matrices scaled by c give c³.
    assert f1 == f2 == pytest.approx((experts * granularity / topk) ** (1 / 3), rel=1e-12)
    assert f1 ** 3 * topk / (experts * granularity) == pytest.approx(1.0, rel=1e-12)


def test_explicit_weight_scaling_overrides_the_router_default():
    assert _spec("softmax_topk", experts=8, topk=2, scaling="none").scale_factors() == (1.0, 1.0)
    assert _spec("topk_softmax", experts=8, topk=2, granularity=2, scaling="cube_root").scale_factors() \
        == pytest.approx((2.0, 2.0))
    assert _spec("softmax_topk", experts=0, topk=0).scale_factors() == (1.0, 1.0)  # dense


# Router initialisation -----------------------------------------------------------------------


def test_router_rows_are_shared_within_a_virtual_group_and_differ_between_groups():
    spec = _spec(experts=4, granularity=3, hidden=16)
    w = router_weights(seed=1, layer=2, spec=spec, std=0.02)
    assert w.shape == (12, 16)
    groups = w.reshape(4, 3, 16)
    assert all(torch.equal(groups[g, i], groups[g, 0]) for g in range(4) for i in range(3))
    assert len({tuple(groups[g, 0].tolist()) for g in range(4)}) == 4


def test_router_rows_depend_only_on_seed_and_layer():
    spec = _spec(experts=8, granularity=2, hidden=16)
    torch.manual_seed(123)  # another rank's global RNG state must not matter
    first = router_weights(5, 1, spec, 0.02)
    torch.manual_seed(456)
    torch.rand(7)
    assert torch.equal(router_weights(5, 1, spec, 0.02), first)
    assert not torch.equal(router_weights(5, 2, spec, 0.02), first), "every layer needs its own router"
    assert not torch.equal(router_weights(6, 1, spec, 0.02), first), "the seed must matter"
    assert torch.equal(router_weights(5, 1, spec, 0.04), 2 * first)
    assert float(first.std()) == pytest.approx(0.02, rel=0.3)


# moe.layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, indices", [
    ("all", (0, 1, 2, 3, 4, 5)), ("every_2", (0, 2, 4)), ("every_4", (0, 4)), ([4, 1, 1], (1, 4)),
])
def test_moe_layer_patterns(layers, indices):
    spec = UpcycleSpec.of(_cfg(layers=layers))
    assert spec.moe_layers == indices
    assert spec.layer_pattern() == [1 if i in indices else 0 for i in range(6)]


@pytest.mark.parametrize("layers", ["every_0", "some", [6]])
def test_bad_moe_layer_patterns_are_refused(layers):
    with pytest.raises(MoELayerSpecError):
        UpcycleSpec.of(_cfg(layers=layers))


def test_spec_counts_fine_grained_experts_and_a_dense_spec_has_none():
    spec = UpcycleSpec.of(_cfg(experts=8, topk=2, granularity=4))
    assert (spec.num_experts, spec.topk, spec.expert_ffn_hidden_size) == (32, 8, 8)
    dense = UpcycleSpec.of(_cfg(experts=0, topk=2, granularity=4, layers=[1]))
    assert (dense.is_moe, dense.num_experts, dense.topk, dense.granularity, dense.moe_layers) == (False, 0, 0, 1, ())


# The pure planner on a hand-built rank --------------------------------------------------------
# 2 layers (layer 0 MoE, layer 1 dense), H=4, F=8, E=4, G=2 (8 experts of width 4),
# TP=2 and expert-TP=2 at rank 1, EP=2 at rank 1: this rank holds fine experts 4..7.

H, F = 4, 8
RANK = RankCoordinates(tp_rank=1, tp_size=2, etp_rank=1, etp_size=2)
MOE_PREFIX = "decoder.layers.0.mlp"


def _dense_checkpoint():
    fc1, fc2 = _dense_ffn(layers=2, ffn=F, hidden=H)
    return {
        "embedding.word_embeddings.weight": torch.arange(16 * H, dtype=torch.float32).reshape(16, H) - 500,
        "decoder.layers.self_attention.linear_qkv.weight":
            torch.arange(2 * 12 * H, dtype=torch.float32).reshape(2, 12, H) + 0.5,
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]),
        FC1_KEY: fc1,
        FC2_KEY: fc2,
    }


def _rank_chunk(hidden=H):
    def expert(e: int) -> LocalExpert:
        local = f"{MOE_PREFIX}.experts.local_experts.{e - 4}"
        return LocalExpert(e, Param(f"{local}.linear_fc1.weight", (4, H)), Param(f"{local}.linear_fc2.weight", (H, 2)))

    state = (
        StateTensor("embedding.word_embeddings.weight", (16, hidden), (8, 0), (8, hidden),
                    parameter="embedding.word_embeddings.weight"),
        StateTensor("decoder.layers.self_attention.linear_qkv.weight", (2, 12, H), (0, 6, 0), (6, H), 1,
                    parameter="decoder.layers.0.self_attention.linear_qkv.weight"),
        StateTensor("decoder.layers.mlp.linear_fc1.layer_norm_weight", (2, H), (1, 0), (H,), 1,
                    parameter="decoder.layers.1.mlp.linear_fc1.layer_norm_weight"),
        # An expert weight in the state dict: planned from the modules, so skipped here.
        StateTensor("decoder.layers.mlp.experts.experts.linear_fc1.weight", (2, 8, 4, H), (0, 4, 0, 0),
                    (4, H), 2, parameter=None),
    )
    ffns = (
        MoeFfn(0, Param(f"{MOE_PREFIX}.router.weight", (8, H)), tuple(expert(e) for e in range(4, 8))),
        DenseFfn(1, Param("decoder.layers.1.mlp.linear_fc1.weight", (F, H)),
                 Param("decoder.layers.1.mlp.linear_fc2.weight", (H, F // 2))),
    )
    return ChunkDescription(state, (FC1_KEY,), ffns)


def _plan(chunk=None, spec=None, shapes=None):
    shapes = shapes or {k: tuple(v.shape) for k, v in _dense_checkpoint().items()}
    return plan_upcycle([chunk or _rank_chunk()], RANK, spec or _spec(experts=4, granularity=2, ffn=F), shapes)


def test_local_experts_read_their_slice_once_and_copy_the_rest():
    plan = _plan()
    by_target = {e.target: e for e in plan.entries}
    dense = _dense_checkpoint()
    fc1, fc2 = dense[FC1_KEY][0], dense[FC2_KEY][0]
    readers = {e.expert: e for e in plan.by_kind("expert") if e.role == "fc1"}
    assert sorted(readers) == [4, 5], "experts 4 and 5 hold the two distinct slices of this rank"
    for e, ffn_slice in ((4, 0), (5, 1)):
        want1, want2 = _expected_shard(fc1, fc2, 2, ffn_slice, rank=1, size=2)
        local = e - 4
        got1 = by_target[f"0/{MOE_PREFIX}.experts.local_experts.{local}.linear_fc1.weight"]
        got2 = by_target[f"0/{MOE_PREFIX}.experts.local_experts.{local}.linear_fc2.weight"]
        assert got1.ffn_slice == ffn_slice and got1.kind == got2.kind == "expert"
        assert torch.equal(_deliver(got1.pieces, dense, got1.shape), want1)
        assert torch.equal(_deliver(got2.pieces, dense, got2.shape), want2)
    # Hand-computed: slice 0 at expert-TP rank 1 is gate rows 2..3, up rows 10..11, fc2 columns 2..3.
    assert [p.dense.offsets for p in readers[4].pieces] == [(0, 2, 0), (0, 10, 0)]
    copies = {e.target: e.copy_from for e in plan.by_kind("copy")}
    name = lambda i, w: f"0/{MOE_PREFIX}.experts.local_experts.{i}.linear_{w}.weight"  # noqa: E731
    assert copies == {name(2, "fc1"): name(0, "fc1"), name(2, "fc2"): name(0, "fc2"),
                      name(3, "fc1"): name(1, "fc1"), name(3, "fc2"): name(1, "fc2")}
    assert [e.pieces for e in plan.by_kind("copy")] == [[]] * 4
    (router,) = plan.by_kind("router")
    assert (router.target, router.shape, router.layer, router.pieces) == \
        (f"0/{MOE_PREFIX}.router.weight", (8, H), 0, [])


def test_dense_layers_and_other_tensors_read_this_ranks_tensor_parallel_shard():
    plan = _plan()
    dense = _dense_checkpoint()
    by_target = {e.target: e for e in plan.entries}
    fc1 = by_target["0/decoder.layers.1.mlp.linear_fc1.weight"]
    fc2 = by_target["0/decoder.layers.1.mlp.linear_fc2.weight"]
    want1, want2 = _expected_shard(dense[FC1_KEY][1], dense[FC2_KEY][1], 1, 0, rank=1, size=2)
    assert torch.equal(_deliver(fc1.pieces, dense, fc1.shape), want1)
    assert torch.equal(_deliver(fc2.pieces, dense, fc2.shape), want2)
    emb = by_target["0/embedding.word_embeddings.weight"]
    assert torch.equal(_deliver(emb.pieces, dense, emb.shape), dense["embedding.word_embeddings.weight"][8:])
    qkv = by_target["0/decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.layer == 0 and [p.squeeze_layer for p in qkv.pieces] == [True]
    assert torch.equal(_deliver(qkv.pieces, dense, qkv.shape),
                       dense["decoder.layers.self_attention.linear_qkv.weight"][0, 6:12])
    norm = by_target["0/decoder.layers.1.mlp.linear_fc1.layer_norm_weight"]
    assert norm.layer == 1 and norm.pieces[0].dense.offsets == (1, 0)
    assert {e.kind for e in plan.entries} == {"dense", "expert", "copy", "router"}
    assert len(plan.entries) == 3 + 1 + 8 + 2, "3 state tensors, the router, 4 experts x 2, the dense FFN"


def test_per_layer_checkpoint_keys_give_the_same_values():
    stacked = _dense_checkpoint()
    per_layer = {}
    for key, t in stacked.items():
        if key.startswith("decoder.layers."):
            for i in range(2):
                per_layer[key.replace("decoder.layers.", f"decoder.layers.{i}.", 1)] = t[i]
        else:
            per_layer[key] = t
    a = _plan()
    b = _plan(shapes={k: tuple(v.shape) for k, v in per_layer.items()})
    assert [e.target for e in a.entries] == [e.target for e in b.entries]
    assert any(s.key == "decoder.layers.0.mlp.linear_fc1.weight" for s in b.dense_slices())
    for x, y in zip(a.entries, b.entries):
        if x.pieces:
            assert torch.equal(_deliver(x.pieces, stacked, x.shape), _deliver(y.pieces, per_layer, y.shape)), x.target


def test_planner_refuses_what_it_cannot_fill():
    chunk = _rank_chunk()
    orphan = StateTensor("embedding.word_embeddings.weight", (16, H), (8, 0), (8, H), parameter=None)
    with pytest.raises(RuntimeError, match="no parameter"):
        _plan(ChunkDescription((orphan,), (), ()))
    with pytest.raises(NotImplementedError, match="factory"):
        _plan(ChunkDescription((), ("embedding.word_embeddings.weight",), ()))
    with pytest.raises(DenseCheckpointMismatch, match="dense FFN fc1 has shape"):
        _plan(chunk, spec=_spec(experts=4, granularity=2, ffn=2 * F))
    wrong_hidden = ChunkDescription((StateTensor("embedding.word_embeddings.weight", (16, 5), (8, 0), (8, 5),
                                                 parameter="embedding.word_embeddings.weight"),), (), ())
    with pytest.raises(DenseCheckpointMismatch, match="does not match the model's"):
        _plan(wrong_hidden)


def test_canonical_names_of_sharded_tensors():
    stacked = StateTensor("decoder.layers.self_attention.linear_proj.weight", (4, 8, 8), (3, 0, 4), (8, 4), 1)
    per_layer = StateTensor("decoder.layers.2.self_attention.linear_proj.weight", (8, 8), (0, 4), (8, 4))
    outside = StateTensor("output_layer.weight", (32, 8), (16, 0), (16, 8))
    assert canonical_name(stacked) == (3, "self_attention.linear_proj.weight", (0, 4))
    assert canonical_name(per_layer) == (2, "self_attention.linear_proj.weight", (0, 4))
    assert canonical_name(outside) == (None, "output_layer.weight", (16, 0))


# The router table ---------------------------------------------------------------------------


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_router_rows_exactness_agrees_with_the_exactness_rules(router):
    row = ROUTERS[router]
    for topk, granularity in itertools.product((1, 2), (1, 2)):
        cfg = _cfg(router=router, experts=4, topk=topk, granularity=granularity)
        exact = inexact_reason(cfg) is None
        assert exact == row.exact_at_step0(topk * granularity), (router, topk, granularity, inexact_reason(cfg))


def test_router_table_states_the_known_exact_cases():
    exact = {t: [ROUTERS[t].exact_at_step0(k) for k in (1, 2)] for t in ROUTERS}
    assert exact == {"topk_softmax": [True, True], "softmax_topk": [False, False],
                     "sinkhorn": [False, False], "aux_free": [False, True]}


# verify's tolerances --------------------------------------------------------------------------

# Measured by verify (README, "verify's tolerances"): (layers, dtype, max|logit|, MoE-vs-dense
# max difference, megatron-core vs transformers max difference, the largest difference a bug
# put into the upcycling gave, or None).
MEASURED = [
    (30, torch.float32, 37.2, 1.03e-4, 9.78e-5, None),  # SmolLM2 at TP3/EP2/ETP1/SP, 6 ranks
    (30, torch.float32, 36.8, 6.68e-5, 6.20e-5, None),  # SmolLM2 at EP2
    (30, torch.bfloat16, 37.0, 1.03, 0.865, None),  # SmolLM2 at EP2
    (30, torch.bfloat16, 37.2, 1.03, 0.975, None),  # SmolLM2 at TP3/EP2/ETP1/SP
    (4, torch.float32, 0.62, 3.28e-7, 2.68e-7, 6.57e-3),  # tiny, its 33 layouts; a wrong expert slice
    (4, torch.float32, 3.34, 2.38e-6, 3.04e-6, 1.07),  # tiny with init 0.1, 8 layouts; wrong slice
    (4, torch.bfloat16, 3.34, 5.47e-2, 5.67e-2, 1.14),  # the same in bf16
]


@pytest.mark.parametrize("layers,dtype,scale,upcycled,imported,bug", MEASURED)
def test_verify_tolerance_covers_measured_rounding_and_fails_a_bug(layers, dtype, scale, upcycled, imported, bug):
    """The derived rule against the runs it was derived from: rounding passes with a margin of
    2, a bug fails by 2, and the tolerance stays a fraction of the logits' magnitude."""
    from nemo_upcycle.upcycle.exactness import logit_tolerance, rounding_tolerance

    cfg = _cfg(num_layers=layers)
    tolerance = logit_tolerance(cfg, dtype, scale)
    assert tolerance == rounding_tolerance(dtype, scale, layers)
    assert 2 * max(upcycled, imported) <= tolerance < 0.2 * max(scale, 1.0)
    if bug is not None:
        assert bug > 2 * tolerance
    assert logit_tolerance(_cfg(num_layers=layers, capacity_factor=1.0), dtype, scale) is None


# ----------------------------------------------------------------------------- both layer specs' names
# megatron-core 0.15.3 saves an MoE layer's pre-MLP norm as ``pre_mlp_layernorm.weight`` under the
# Transformer Engine spec and as ``mlp.linear_fc1.layer_norm_weight`` under the local spec (whose
# keys map renames it); tests/workers/upcycle_checks.py builds both with megatron-core's own modules.

TE_MOE_STATE = {
    "module.embedding.word_embeddings.weight": (16, 4),
    "module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (4,),
    "module.decoder.layers.0.pre_mlp_layernorm.weight": (4,),
    "module.decoder.layers.0.mlp.router.weight": (8, 4),
    "module.decoder.layers.0.mlp.experts.experts.linear_fc1.weight": (8, 8, 4),
    "module.decoder.layers.1.mlp.linear_fc1.layer_norm_weight": (4,),
    "module.decoder.layers.1.mlp.linear_fc1.weight": (16, 4),
    "optimizer.state.exp_avg.module.decoder.layers.0.pre_mlp_layernorm.weight": (4,),
    "module.decoder.layers.0.self_attention.linear_qkv._extra_state/shard_0_1": (),
}


def test_either_layer_specs_keys_read_as_the_same_canonical_tensor():
    from nemo_upcycle.model.megatron_keys import (MLP_NORM, TE_NAMES, MegatronNaming, canonical_key,
                                                  parse_megatron_key)

    assert parse_megatron_key("module.decoder.layers.0.pre_mlp_layernorm.weight") == (MLP_NORM, False, 0)
    assert parse_megatron_key("decoder.layers.pre_mlp_layernorm.weight") == (MLP_NORM, True, -1)
    assert canonical_key("optimizer.state.exp_avg.module.decoder.layers.0.pre_mlp_layernorm.weight") == \
        "optimizer.state.exp_avg.module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    naming = MegatronNaming.of_keys(TE_MOE_STATE)
    assert (naming.stacked, naming.prefix, naming.layer_naming, naming.moe_layers) == \
        (False, "module.", TE_NAMES, frozenset({0}))
    assert naming.key(0, MLP_NORM, None)[0] == "module.decoder.layers.0.pre_mlp_layernorm.weight"
    assert naming.key(1, MLP_NORM, None)[0] == "module.decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    resolver = DenseKeyResolver(TE_MOE_STATE, num_layers=2)
    assert resolver.resolve(0, MLP_NORM) == ("module.decoder.layers.0.pre_mlp_layernorm.weight", (), False)
    # A dense model is named alike by both specs: a dense checkpoint reads as the local naming.
    assert MegatronNaming.of_keys(STACKED).layer_naming == "local"


def test_a_te_named_moe_plans_its_norm_from_the_dense_layers_norm():
    te_norm = StateTensor("decoder.layers.0.pre_mlp_layernorm.weight", (H,), (0,), (H,),
                          parameter="decoder.layers.0.pre_mlp_layernorm.weight")
    assert canonical_name(te_norm) == (0, "mlp.linear_fc1.layer_norm_weight", (0,))
    chunk = _rank_chunk()
    plan = _plan(ChunkDescription(chunk.state + (te_norm,), chunk.factory_keys, chunk.ffns))
    (norm,) = [e for e in plan.entries if e.target == "0/decoder.layers.0.pre_mlp_layernorm.weight"]
    dense = _dense_checkpoint()
    want = dense["decoder.layers.mlp.linear_fc1.layer_norm_weight"][0]
    assert torch.equal(_deliver(norm.pieces, dense, norm.shape), want)


def test_a_checkpoint_of_one_naming_maps_onto_a_model_of_the_other_and_nothing_else_is_let_through():
    from nemo_upcycle.model.megatron_keys import checkpoint_spellings, model_key_mismatch

    local_model = ["module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight",  # the TE checkpoint's layer-0 norm
                   "module.decoder.layers.1.mlp.linear_fc1.layer_norm_weight",  # a dense layer: same in both
                   "optimizer.state.exp_avg.module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
                   "decoder.layers.0.mlp.router.weight"]  # no prefix on this side
    assert checkpoint_spellings(local_model, TE_MOE_STATE) == {
        local_model[0]: "module.decoder.layers.0.pre_mlp_layernorm.weight",
        local_model[2]: "optimizer.state.exp_avg.module.decoder.layers.0.pre_mlp_layernorm.weight",
        local_model[3]: "module.decoder.layers.0.mlp.router.weight"}
    model = [k for k in TE_MOE_STATE if not k.startswith("optimizer.")]
    assert not model_key_mismatch(model, TE_MOE_STATE), "_extra_state and optimizer states are no model weights"
    missing = model_key_mismatch(model + ["module.output_layer.weight"], TE_MOE_STATE)
    assert missing.missing == ("module.output_layer.weight",) and not missing.unexpected
    unexpected = model_key_mismatch(model[1:], TE_MOE_STATE)
    assert unexpected.unexpected == ("module.embedding.word_embeddings.weight",) and not unexpected.missing
    assert "1 model tensor(s) in the checkpoint but not in the model: module.embedding" in unexpected.describe()
