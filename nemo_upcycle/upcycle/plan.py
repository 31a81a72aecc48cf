"""The upcycle plan: where every tensor of this rank's MoE model comes from.

A pure description, computed from a plain-data description of the MoE model chunk(s)
this rank built (:mod:`~nemo_upcycle.upcycle.local_model`), the rank's coordinates, the
:class:`~nemo_upcycle.upcycle.spec.UpcycleSpec` and the dense checkpoint's *metadata*
(tensor names and global shapes), before any weight is read. Each entry says, for one
local tensor:

* ``dense``: the same tensor of the dense model (attention, norms, embeddings, output
  layer, and the FFNs of layers that stay dense): the slice of the dense tensor this
  rank's shard covers;
* ``expert``: expert ``e`` of layer ``l``: the slice of the dense FFN of layer ``l`` that
  this rank's expert-tensor-parallel shard covers; for granular experts (G > 1) the
  ``e mod G``-th slice of the intermediate dimension. Only the first local expert that
  needs a given slice reads it;
* ``copy``: another local expert needs the same slice: copied in memory after the read;
* ``shared``: the shared expert (``moe.shared_expert``): the whole FFN or its first S slices,
  this rank's tensor-parallel shard of it;
* ``router``, ``shared_gate``: initialised, not read (random rows; zeros).

Keys are matched to the checkpoint by :class:`~nemo_upcycle.upcycle.dense_keys.DenseKeyResolver`
(stacked or per-layer keys, with or without NeMo 2's ``module.`` prefix); the MoE model's own
keys are read in either layer spec's naming (:mod:`nemo_upcycle.model.megatron_keys`: the TE
spec's ``pre_mlp_layernorm.weight`` of an MoE layer is the dense layer's
``mlp.linear_fc1.layer_norm_weight``).
:func:`plan_upcycle` is the planner; :func:`build_plan` feeds it from megatron-core chunks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from nemo_upcycle.model.megatron_keys import FC1, FC2, canonical_key, parse_megatron_key
from nemo_upcycle.upcycle.dense_keys import DenseKeyResolver
from nemo_upcycle.errors import DenseCheckpointMismatch
from nemo_upcycle.upcycle.local_model import (
    ChunkDescription,
    DenseFfn,
    Ffn,
    MoeFfn,
    RankCoordinates,
    StateTensor,
)
from nemo_upcycle.upcycle.spec import UpcycleSpec
from nemo_upcycle.upcycle.walk_megatron import describe_chunks


@dataclass(frozen=True)
class DenseSlice:
    """A box of a dense checkpoint tensor: ``key[offsets : offsets + shape]``."""

    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Piece:
    """One dense slice delivered into rows ``[row, row + slice rows)`` of the target."""

    dense: DenseSlice
    row: int = 0
    # The checkpoint stacks layers but the target has no layer axis: drop dim 0 of the slice.
    squeeze_layer: bool = False


@dataclass
class PlanEntry:
    target: str  # "<chunk>/<parameter name>"
    kind: str  # "dense" | "expert" | "copy" | "shared" | "router" | "shared_gate"
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)
    copy_from: Optional[str] = None
    layer: Optional[int] = None  # global layer index (0-based)
    expert: Optional[int] = None  # global expert index (fine-grained)
    ffn_slice: Optional[int] = None  # which of the G slices of the dense FFN
    role: Optional[str] = None  # "fc1" | "fc2" for FFN tensors


@dataclass
class UpcyclePlan:
    entries: list[PlanEntry]

    def by_kind(self, kind: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind == kind]

    def dense_slices(self) -> list[DenseSlice]:
        return [p.dense for e in self.entries for p in e.pieces]

    def elements_requested(self) -> int:
        return sum(s.numel for s in self.dense_slices())


@dataclass(frozen=True)
class FfnKeys:
    """Where the dense FFN of one layer is stored in the checkpoint."""

    fc1: str
    fc2: str
    lead: tuple[int, ...]  # leading offsets: (layer,) for stacked keys, () per layer
    stacked: bool  # the keys have a layer axis the targets lack


def ffn_keys(resolver: DenseKeyResolver, layer: int) -> FfnKeys:
    fc1, lead, stacked = resolver.resolve(layer, FC1)
    fc2, _, _ = resolver.resolve(layer, FC2)
    return FfnKeys(fc1, fc2, lead, stacked)


def ffn_pieces(
    keys: FfnKeys,
    *,
    ffn_hidden: int,
    hidden: int,
    granularity: int,
    ffn_slice: int,
    tp_rank: int,
    tp_size: int,
) -> tuple[list[Piece], list[Piece]]:
    """Dense slices of one (expert) FFN shard: (fc1 pieces, fc2 pieces): slice ``ffn_slice`` of
    width F/G (:func:`ffn_block_pieces`)."""
    width = ffn_hidden // granularity
    return ffn_block_pieces(keys, ffn_hidden=ffn_hidden, hidden=hidden, start=ffn_slice * width, width=width,
                            tp_rank=tp_rank, tp_size=tp_size)


def ffn_block_pieces(
    keys: FfnKeys,
    *,
    ffn_hidden: int,
    hidden: int,
    start: int,
    width: int,
    tp_rank: int,
    tp_size: int,
) -> tuple[list[Piece], list[Piece]]:
    """Dense slices of the shard of intermediate neurons ``[start, start + width)`` of a dense FFN.

    megatron-core stores a SwiGLU fc1 as [gate (F rows); up (F rows)] and gives each of the
    ``tp_size`` ranks [gate_r; up_r]. The block takes rows ``start ...`` of gate and of up, and
    the same columns of fc2; rank r its r-th part. ``tp_*`` is whichever group splits this FFN:
    tensor parallelism for a dense FFN or a shared expert, expert-TP for routed experts.
    """
    local = width // tp_size
    base = start + tp_rank * local
    lead, squeeze = keys.lead, keys.stacked
    one = (1,) * len(lead)
    if width == ffn_hidden and tp_size == 1:
        fc1 = [Piece(DenseSlice(keys.fc1, lead + (0, 0), one + (2 * local, hidden)), 0, squeeze)]
    else:
        fc1 = [
            Piece(DenseSlice(keys.fc1, lead + (base, 0), one + (local, hidden)), 0, squeeze),
            Piece(DenseSlice(keys.fc1, lead + (ffn_hidden + base, 0), one + (local, hidden)), local, squeeze),
        ]
    fc2 = [Piece(DenseSlice(keys.fc2, lead + (0, base), one + (hidden, local)), 0, squeeze)]
    return fc1, fc2


def canonical_name(tensor: StateTensor) -> tuple[Optional[int], str, tuple[int, ...]]:
    """(global layer, name within the layer, offsets within the layer's tensor) of a sharded tensor."""
    name, stacked, layer = parse_megatron_key(tensor.key)
    offsets = tuple(tensor.global_offset)
    if layer >= 0:
        return layer, name, offsets
    if stacked and tensor.prepend_axis_num >= 1:
        return offsets[0], name, offsets[1:]
    return None, canonical_key(tensor.key), offsets


def _is_ffn_or_router(name: str) -> bool:
    """FFN weights and routers are planned from the modules, not from the state dict."""
    if not name.startswith("mlp."):
        return False
    return not name.endswith("layer_norm_weight") and not name.endswith("layer_norm_bias")


def plan_upcycle(
    chunks: Sequence[ChunkDescription],
    rank: RankCoordinates,
    spec: UpcycleSpec,
    dense_shapes: Mapping[str, tuple[int, ...]],
) -> UpcyclePlan:
    """Plan every tensor of this rank's model chunks (MoE or dense) from the dense checkpoint.

    Pure: plain data in, plan out. Targets are named ``"<chunk index>/<parameter name>"``.
    """
    resolver = DenseKeyResolver(dense_shapes, spec.num_layers)
    entries: list[PlanEntry] = []
    for c, chunk in enumerate(chunks):
        for key in chunk.factory_keys:
            if not _is_ffn_or_router(parse_megatron_key(key)[0]):
                raise NotImplementedError(f"unexpected sharded tensor factory {key}")
        for tensor in chunk.state:
            entry = _state_entry(c, tensor, resolver)
            if entry is not None:
                entries.append(entry)
        for ffn in chunk.ffns:
            entries += _ffn_entries(c, ffn, resolver, spec, rank)
    return UpcyclePlan(entries)


def _state_entry(c: int, tensor: StateTensor, resolver: DenseKeyResolver) -> Optional[PlanEntry]:
    """The dense slice behind one non-FFN tensor of the state dict (None for FFN tensors)."""
    layer, name, offsets = canonical_name(tensor)
    if _is_ffn_or_router(name):
        return None
    key, lead, stacked = resolver.resolve(layer, name)
    prepend = tensor.prepend_axis_num
    want = tuple(tensor.global_shape[prepend:]) if stacked or prepend == 0 else tuple(tensor.global_shape)
    have = resolver.dense_shape(layer, name)
    if tuple(have) != tuple(want[-len(have):]) or len(have) != len(tensor.local_shape):
        raise DenseCheckpointMismatch(
            f"{key}: the dense checkpoint's shape {list(have)} does not match the "
            f"model's {list(want)}; check model.* (hidden size, heads, vocab) against "
            "the checkpoint"
        )
    if tensor.parameter is None:
        raise RuntimeError(f"no parameter of chunk {c} backs sharded tensor {tensor.key}")
    shape = tuple(tensor.local_shape)
    piece = Piece(DenseSlice(key, lead + offsets, (1,) * len(lead) + shape), 0, bool(lead))
    return PlanEntry(target=f"{c}/{tensor.parameter}", kind="dense", shape=shape, pieces=[piece], layer=layer)


def _ffn_entries(c: int, ffn: Ffn, resolver: DenseKeyResolver, spec: UpcycleSpec,
                 rank: RankCoordinates) -> list[PlanEntry]:
    layer = ffn.layer
    keys = ffn_keys(resolver, layer)
    fc1_dense = resolver.dense_shape(layer, FC1)
    if fc1_dense != (2 * spec.ffn_hidden_size, spec.hidden_size):
        raise DenseCheckpointMismatch(
            f"{keys.fc1}: dense FFN fc1 has shape {list(fc1_dense)} per layer, expected "
            f"[2*ffn_hidden_size, hidden_size] = [{2 * spec.ffn_hidden_size}, "
            f"{spec.hidden_size}]; check model.ffn_hidden_size/hidden_size"
        )
    if isinstance(ffn, DenseFfn):
        fc1, fc2 = ffn_pieces(keys, ffn_hidden=spec.ffn_hidden_size, hidden=spec.hidden_size,
                              granularity=1, ffn_slice=0, tp_rank=rank.tp_rank, tp_size=rank.tp_size)
        return [
            PlanEntry(f"{c}/{ffn.fc1.name}", "dense", ffn.fc1.shape, fc1, layer=layer, role="fc1"),
            PlanEntry(f"{c}/{ffn.fc2.name}", "dense", ffn.fc2.shape, fc2, layer=layer, role="fc2"),
        ]
    return _moe_entries(c, ffn, keys, spec, rank)


def _moe_entries(c: int, ffn: MoeFfn, keys: FfnKeys, spec: UpcycleSpec, rank: RankCoordinates) -> list[PlanEntry]:
    """The router, then per local expert its FFN slice (read by the first expert that needs it),
    then the shared expert."""
    layer = ffn.layer
    entries = [PlanEntry(f"{c}/{ffn.router.name}", "router", ffn.router.shape, layer=layer)]
    first_reader: dict[int, tuple[str, str]] = {}
    for local in ffn.experts:
        ffn_slice = spec.ffn_slice_of(local.expert)
        t1, t2 = f"{c}/{local.fc1.name}", f"{c}/{local.fc2.name}"
        common = dict(layer=layer, expert=local.expert, ffn_slice=ffn_slice)
        if ffn_slice in first_reader:
            src1, src2 = first_reader[ffn_slice]
            entries.append(PlanEntry(t1, "copy", local.fc1.shape, copy_from=src1, role="fc1", **common))
            entries.append(PlanEntry(t2, "copy", local.fc2.shape, copy_from=src2, role="fc2", **common))
            continue
        first_reader[ffn_slice] = (t1, t2)
        fc1, fc2 = ffn_pieces(keys, ffn_hidden=spec.ffn_hidden_size, hidden=spec.hidden_size,
                              granularity=spec.granularity, ffn_slice=ffn_slice,
                              tp_rank=rank.etp_rank, tp_size=rank.etp_size)
        entries.append(PlanEntry(t1, "expert", local.fc1.shape, fc1, role="fc1", **common))
        entries.append(PlanEntry(t2, "expert", local.fc2.shape, fc2, role="fc2", **common))
    if (ffn.shared is not None) != spec.has_shared_expert:
        raise RuntimeError(f"layer {layer}: the model was built {'with' if ffn.shared else 'without'} a shared "
                           f"expert, but moe.shared_expert.mode={spec.shared_mode}")
    if ffn.shared is not None:
        entries += _shared_entries(c, ffn, keys, spec, rank)
    return entries


def _shared_entries(c: int, ffn: MoeFfn, keys: FfnKeys, spec: UpcycleSpec, rank: RankCoordinates) -> list[PlanEntry]:
    """The shared expert's tensor-parallel shard of its block of the dense FFN (its first
    ``shared_ffn_hidden_size`` neurons), and its gate (zeros)."""
    shared, layer = ffn.shared, ffn.layer
    fc1, fc2 = ffn_block_pieces(keys, ffn_hidden=spec.ffn_hidden_size, hidden=spec.hidden_size, start=0,
                                width=spec.shared_ffn_hidden_size, tp_rank=rank.tp_rank, tp_size=rank.tp_size)
    entries = [PlanEntry(f"{c}/{shared.fc1.name}", "shared", shared.fc1.shape, fc1, layer=layer, role="fc1"),
               PlanEntry(f"{c}/{shared.fc2.name}", "shared", shared.fc2.shape, fc2, layer=layer, role="fc2")]
    if shared.gate is not None:
        entries.append(PlanEntry(f"{c}/{shared.gate.name}", "shared_gate", shared.gate.shape, layer=layer))
    return entries


def build_plan(chunks: list, cfg: Any, dense_shapes: Mapping[str, tuple[int, ...]]) -> UpcyclePlan:
    """:func:`plan_upcycle` for megatron-core model chunks, at the current parallel state."""
    return plan_upcycle(describe_chunks(chunks), RankCoordinates.current(), UpcycleSpec.of(cfg), dense_shapes)
