"""The upcycle plan: where every tensor of this rank's MoE model comes from.

A pure description, computed from the MoE model chunk(s) this rank built and the
dense checkpoint's *metadata* (tensor names and global shapes), before any weight is
read. Each entry says, for one local tensor:

* ``dense``: the same tensor of the dense model (attention, norms, embeddings, output
  layer, and the FFNs of layers that stay dense): the slice of the dense tensor this
  rank's shard covers;
* ``expert``: expert ``e`` of layer ``l``: the slice of the dense FFN of layer ``l`` that
  this rank's expert-tensor-parallel shard covers; for granular experts (G > 1) the
  ``e mod G``-th slice of the intermediate dimension. Only the first local expert that
  needs a given slice reads it;
* ``copy``: another local expert needs the same slice: copied in memory after the read;
* ``router``: initialised, not read.

Keys are matched to the checkpoint whether it stores layers stacked
(``decoder.layers.mlp.linear_fc1.weight`` of shape (L, ...)) or one key per layer
(``decoder.layers.3.mlp...``), and with or without NeMo 2's ``module.`` prefix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from nemo_upcycle.upcycle.errors import DenseCheckpointMismatch

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_PREFIX = "decoder.layers."


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
    kind: str  # "dense" | "expert" | "copy" | "router"
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

    def summary(self) -> dict:
        kinds = {}
        for e in self.entries:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return {"entries": kinds, "elements_requested": self.elements_requested()}


class DenseKeyResolver:
    """Maps (layer, name) of the model to the dense checkpoint's key and offset prefix."""

    def __init__(self, dense_shapes: dict[str, tuple[int, ...]], num_layers: Optional[int]):
        self.shapes = dense_shapes
        self.num_layers = num_layers  # None: not known yet (reading the architecture)
        self.prefix = "module." if any(k.startswith("module.") for k in dense_shapes) else ""

    def has(self, layer: Optional[int], name: str) -> bool:
        try:
            self.resolve(layer, name)
        except DenseCheckpointMismatch:
            return False
        return True

    def layer_count(self, name: str) -> int:
        """How many layers hold ``name`` (stacked: the leading axis; else the per-layer keys)."""
        stacked = f"{self.prefix}{_STACKED_PREFIX}{name}"
        if stacked in self.shapes:
            return self.shapes[stacked][0]
        pattern = re.compile(rf"^{re.escape(self.prefix + _STACKED_PREFIX)}(\d+)\.{re.escape(name)}$")
        layers = {int(m.group(1)) for k in self.shapes if (m := pattern.match(k))}
        if not layers:
            raise DenseCheckpointMismatch(f"the dense checkpoint has no tensor {name!r} in any layer")
        return max(layers) + 1

    def resolve(self, layer: Optional[int], name: str) -> tuple[str, tuple[int, ...], bool]:
        """(checkpoint key, leading offsets, whether that key has a stacked layer axis)."""
        if layer is None:
            key = self.prefix + name
            if key in self.shapes:
                return key, (), False
            raise DenseCheckpointMismatch(f"the dense checkpoint has no tensor {key!r}")
        stacked = f"{self.prefix}{_STACKED_PREFIX}{name}"
        if stacked in self.shapes:
            rows = self.shapes[stacked][0]
            if self.num_layers is not None and rows != self.num_layers:
                raise DenseCheckpointMismatch(
                    f"the dense checkpoint has {rows} layers ({stacked} has shape "
                    f"{list(self.shapes[stacked])}) but model.num_layers={self.num_layers}"
                )
            return stacked, (layer,), True
        per_layer = f"{self.prefix}{_STACKED_PREFIX}{layer}.{name}"
        if per_layer in self.shapes:
            return per_layer, (), False
        raise DenseCheckpointMismatch(
            f"the dense checkpoint has no tensor for layer {layer} {name!r} "
            f"(looked for {stacked!r} and {per_layer!r})"
        )

    def dense_shape(self, layer: Optional[int], name: str) -> tuple[int, ...]:
        key, lead, stacked = self.resolve(layer, name)
        shape = self.shapes[key]
        return shape[1:] if stacked else shape


def _canonical(sh_ten) -> tuple[Optional[int], str, tuple[int, ...]]:
    """(global layer, name within the layer, offsets within the layer's tensor)."""
    key = sh_ten.key
    match = _LAYER_KEY.match(key)
    if match:
        return int(match.group(1)), match.group(2), tuple(sh_ten.global_offset)
    if key.startswith(_STACKED_PREFIX) and sh_ten.prepend_axis_num >= 1:
        offsets = tuple(sh_ten.global_offset)
        return offsets[0], key[len(_STACKED_PREFIX):], offsets[1:]
    return None, key, tuple(sh_ten.global_offset)


def _is_ffn_or_router(name: str) -> bool:
    """FFN weights and routers are planned from the modules, not from the state dict."""
    if not name.startswith("mlp."):
        return False
    return not name.endswith("layer_norm_weight") and not name.endswith("layer_norm_bias")


def ffn_pieces(
    layer_lead: tuple[int, ...],
    squeeze: bool,
    fc1_key: str,
    fc2_key: str,
    ffn_hidden: int,
    hidden: int,
    granularity: int,
    ffn_slice: int,
    tp_rank: int,
    tp_size: int,
) -> tuple[list[Piece], list[Piece]]:
    """Dense slices of one (expert) FFN shard.

    megatron-core stores a SwiGLU fc1 as [gate (F rows); up (F rows)] and gives each of the
    ``tp_size`` ranks [gate_r; up_r]. Expert slice ``s`` of width F/G takes rows
    ``s*F/G ...`` of gate and of up, and the same columns of fc2.
    """
    width = ffn_hidden // granularity // tp_size
    base = ffn_slice * (ffn_hidden // granularity) + tp_rank * width
    one = (1,) * len(layer_lead)
    if granularity == 1 and tp_size == 1:
        fc1 = [Piece(DenseSlice(fc1_key, layer_lead + (0, 0), one + (2 * width, hidden)), 0, squeeze)]
    else:
        fc1 = [
            Piece(DenseSlice(fc1_key, layer_lead + (base, 0), one + (width, hidden)), 0, squeeze),
            Piece(DenseSlice(fc1_key, layer_lead + (ffn_hidden + base, 0), one + (width, hidden)), width, squeeze),
        ]
    fc2 = [Piece(DenseSlice(fc2_key, layer_lead + (0, base), one + (hidden, width)), 0, squeeze)]
    return fc1, fc2


def local_expert_weights(experts) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """(fc1 name, fc1 [2F_local, H], fc2 name, fc2 [H, F_local]) per local expert.

    Supports megatron-core's SequentialMLP (local spec) and TEGroupedMLP (TE + grouped GEMM).
    """
    if hasattr(experts, "local_experts"):
        return [
            (
                f"local_experts.{i}.linear_fc1.weight",
                mlp.linear_fc1.weight,
                f"local_experts.{i}.linear_fc2.weight",
                mlp.linear_fc2.weight,
            )
            for i, mlp in enumerate(experts.local_experts)
        ]
    if hasattr(experts.linear_fc1, "weight0"):
        return [
            (
                f"linear_fc1.weight{i}",
                getattr(experts.linear_fc1, f"weight{i}"),
                f"linear_fc2.weight{i}",
                getattr(experts.linear_fc2, f"weight{i}"),
            )
            for i in range(experts.num_local_experts)
        ]
    raise NotImplementedError(
        f"unsupported experts module {type(experts).__name__}: use SequentialMLP (local spec) "
        "or TEGroupedMLP (moe_grouped_gemm with Transformer Engine)"
    )


def build_plan(chunks: list, cfg, dense_shapes: dict[str, tuple[int, ...]]) -> UpcyclePlan:
    """Plan every tensor of this rank's model chunks (MoE or dense) from the dense checkpoint."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    model = cfg.model
    granularity = cfg.moe.granularity if cfg.moe.num_experts > 0 else 1
    resolver = DenseKeyResolver(dense_shapes, model.num_layers)
    entries: list[PlanEntry] = []
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()

    for c, chunk in enumerate(chunks):
        names = {p.data_ptr(): n for n, p in chunk.named_parameters()}
        for sh in nested_values(chunk.sharded_state_dict()):
            if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                continue  # ShardedObjects: TE/FP8 extra state, rebuilt at step 0
            layer, name, offsets = _canonical(sh) if isinstance(sh, ShardedTensor) else (None, sh.key, ())
            if isinstance(sh, ShardedTensorFactory):
                match = _LAYER_KEY.match(sh.key)
                inner = match.group(2) if match else sh.key[len(_STACKED_PREFIX):]
                if _is_ffn_or_router(inner):
                    continue
                raise NotImplementedError(f"unexpected sharded tensor factory {sh.key}")
            if _is_ffn_or_router(name):
                continue
            key, lead, stacked = resolver.resolve(layer, name)
            want = tuple(sh.global_shape[sh.prepend_axis_num:]) if stacked or sh.prepend_axis_num == 0 else tuple(sh.global_shape)
            have = resolver.dense_shape(layer, name)
            if tuple(have) != tuple(want[-len(have):]) or len(have) != len(sh.local_shape):
                raise DenseCheckpointMismatch(
                    f"{key}: the dense checkpoint's shape {list(have)} does not match the "
                    f"model's {list(want)}; check model.* (hidden size, heads, vocab) against "
                    "the checkpoint"
                )
            shape = tuple(sh.local_shape)
            lead_shape = (1,) * len(lead)
            target = names.get(sh.data.data_ptr())
            if target is None:
                raise RuntimeError(f"no parameter of chunk {c} backs sharded tensor {sh.key}")
            entries.append(
                PlanEntry(
                    target=f"{c}/{target}",
                    kind="dense",
                    shape=shape,
                    pieces=[Piece(DenseSlice(key, lead + offsets, lead_shape + shape), 0, bool(lead))],
                    layer=layer,
                )
            )

        # One walk of the module tree per chunk (a walk per layer is quadratic in depth).
        module_names = {id(m): n for n, m in chunk.named_modules()}
        for layer_module in chunk.decoder.layers:
            layer = layer_module.layer_number - 1
            mlp = layer_module.mlp
            prefix = f"{c}/" + _module_name(module_names, mlp)
            fc1_key, lead, stacked = resolver.resolve(layer, "mlp.linear_fc1.weight")
            fc2_key, _, _ = resolver.resolve(layer, "mlp.linear_fc2.weight")
            fc1_dense = resolver.dense_shape(layer, "mlp.linear_fc1.weight")
            if fc1_dense != (2 * model.ffn_hidden_size, model.hidden_size):
                raise DenseCheckpointMismatch(
                    f"{fc1_key}: dense FFN fc1 has shape {list(fc1_dense)} per layer, expected "
                    f"[2*ffn_hidden_size, hidden_size] = [{2 * model.ffn_hidden_size}, "
                    f"{model.hidden_size}]; check model.ffn_hidden_size/hidden_size"
                )
            if not hasattr(mlp, "router"):
                fc1, fc2 = ffn_pieces(lead, stacked, fc1_key, fc2_key, model.ffn_hidden_size,
                                      model.hidden_size, 1, 0, tp_rank, tp_size)
                entries.append(PlanEntry(f"{prefix}.linear_fc1.weight", "dense",
                                         tuple(mlp.linear_fc1.weight.shape), fc1, layer=layer, role="fc1"))
                entries.append(PlanEntry(f"{prefix}.linear_fc2.weight", "dense",
                                         tuple(mlp.linear_fc2.weight.shape), fc2, layer=layer, role="fc2"))
                continue
            entries.append(PlanEntry(f"{prefix}.router.weight", "router",
                                     tuple(mlp.router.weight.shape), layer=layer))
            first_reader: dict[int, tuple[str, str]] = {}
            for local_idx, (n1, w1, n2, w2) in enumerate(local_expert_weights(mlp.experts)):
                expert = mlp.local_expert_indices[local_idx]
                ffn_slice = expert % granularity
                t1, t2 = f"{prefix}.experts.{n1}", f"{prefix}.experts.{n2}"
                common = dict(layer=layer, expert=expert, ffn_slice=ffn_slice)
                if ffn_slice in first_reader:
                    src1, src2 = first_reader[ffn_slice]
                    entries.append(PlanEntry(t1, "copy", tuple(w1.shape), copy_from=src1, role="fc1", **common))
                    entries.append(PlanEntry(t2, "copy", tuple(w2.shape), copy_from=src2, role="fc2", **common))
                    continue
                first_reader[ffn_slice] = (t1, t2)
                fc1, fc2 = ffn_pieces(lead, stacked, fc1_key, fc2_key, model.ffn_hidden_size,
                                      model.hidden_size, granularity, ffn_slice, etp_rank, etp_size)
                entries.append(PlanEntry(t1, "expert", tuple(w1.shape), fc1, role="fc1", **common))
                entries.append(PlanEntry(t2, "expert", tuple(w2.shape), fc2, role="fc2", **common))
    return UpcyclePlan(entries)


def _module_name(names: dict[int, str], module: torch.nn.Module) -> str:
    if id(module) in names:
        return names[id(module)]
    raise KeyError(f"{type(module).__name__} is not part of the model chunk")
