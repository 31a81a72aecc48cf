"""megatron-core's checkpoint keys of a GPTModel, under both layer specs: the one place that spells them.

Why here, in ``model/``: the keys are those of the GPTModel that :mod:`nemo_upcycle.model.modeling`
builds, and which of megatron-core's layer specs it builds with decides one of them. Every
reader and writer of such a checkpoint (the HF mapping, the safetensors and GGUF readers and
the importer in ``checkpoint/``, the upcycle plan and the dense-key resolver in ``upcycle/``,
the exporter, the evaluation loader, resume) takes the names from beside that builder. The
module holds strings and plain functions only (megatron-core is imported lazily, by the
functions that rename megatron's sharded objects), so any package may import it.

What megatron-core 0.15.3 writes (``models/gpt/gpt_layer_specs.py``,
``transformer/transformer_layer.py``, ``transformer/moe/experts.py``,
``extensions/transformer_engine.py``):

* **Stacked or per layer.** Layers of one structure are saved stacked,
  ``decoder.layers.<name>`` with a leading layer axis; when dense and MoE layers alternate
  (a ``moe_layer_freq`` list: every MoE model built here) one key per layer,
  ``decoder.layers.<i>.<name>``. NeMo 2 prefixes every model key with ``module.``; optimizer
  states embed the model key (``optimizer.state.exp_avg.module.decoder...``).
* **The two layer specs.** The local spec gives every layer a ``pre_mlp_layernorm`` module
  and saves it, through its ``sharded_state_dict_keys_map`` (``"pre_mlp_layernorm." ->
  "mlp.linear_fc1.layer_norm_"``, which ``TransformerLayer.sharded_state_dict`` applies), as
  ``mlp.linear_fc1.layer_norm_weight``; the input norm likewise as
  ``self_attention.linear_qkv.layer_norm_weight``. The Transformer Engine spec fuses the norms
  into ``TELayerNormColumnParallelLinear`` and saves them under the same two names, except in
  an MoE layer: its MLP is a router with experts and has no ``linear_fc1``, so the layer keeps
  a ``pre_mlp_layernorm`` of its own, saved as ``pre_mlp_layernorm.weight``. A dense
  checkpoint is therefore named alike under both specs; an MoE checkpoint differs in one key
  per MoE layer (:data:`TE_NAMES` vs :data:`LOCAL_NAMES`).
* **Experts.** SequentialMLP (local spec) and TEGroupedMLP (TE with grouped GEMM, parameters
  ``weight0..N-1``) save each expert's weights under the same keys,
  ``mlp.experts.experts.linear_fc{1,2}.weight`` with a global expert axis.
* **Shared experts.** ``mlp.shared_experts.linear_fc{1,2}.weight`` (tensor-parallel, no expert
  axis) and, when gated, ``mlp.shared_experts.gate_weight``, under both specs.
* **``_extra_state``.** Every linear layer adds a ShardedObject ``<module>._extra_state``
  (Transformer Engine's FP8 metadata; empty for the local layers). It is no weight: readers
  skip it and the strict-load check ignores it on both sides.

The canonical spelling of a key is the local spec's (:func:`canonical_key`): a key of either
spec, with or without ``module.``, maps to it unambiguously, so a checkpoint of one naming
loads into a model of the other by renaming (:func:`checkpoint_spellings`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

# Canonical names within a layer (the local spec's spelling).
ATTN_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"  # Qwen2
Q_NORM = "self_attention.q_layernorm.weight"  # Qwen3: per-head RMSNorm, applied before RoPE
K_NORM = "self_attention.k_layernorm.weight"
PROJ = "self_attention.linear_proj.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
ROUTER = "mlp.router.weight"
ROUTER_BIAS = "mlp.router.expert_bias"  # router=aux_free: added to the scores for the choice only
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"
EXPERT_NAMES = (EXPERT_FC1, EXPERT_FC2)
# The shared expert (megatron-core's SharedExpertMLP: tensor-parallel like a dense FFN, fc1
# [gate; up]; gate_weight (1, H) only with a sigmoid gate), the same under both layer specs.
SHARED_FC1 = "mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "mlp.shared_experts.linear_fc2.weight"
SHARED_GATE = "mlp.shared_experts.gate_weight"
# Outside the layers.
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"

# The layer specs' namings of an MoE layer's pre-MLP norm.
LOCAL_NAMES = "local"  # mlp.linear_fc1.layer_norm_weight (the local spec's keys map)
TE_NAMES = "transformer_engine"  # pre_mlp_layernorm.weight (the TE spec keeps the module's own name)
LAYER_NAMINGS = (LOCAL_NAMES, TE_NAMES)
TE_MOE_NORM = "pre_mlp_layernorm.weight"
# The local spec's sharded_state_dict_keys_map (gpt_layer_specs.get_gpt_layer_local_spec):
# the norms' module names -> their checkpoint names. The TE spec's MoE layers lack the second.
LOCAL_SPEC_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                       "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
MOE_NORM_MODULE = "pre_mlp_layernorm."
_TE_NORM_SEGMENT = re.compile(r"(^|\.)pre_mlp_layernorm\.")

NEMO_PREFIX = "module."  # NeMo 2's MegatronParallel wraps the model as ``module``
_MODEL_ROOTS = ("embedding.", "decoder.", "output_layer.")

Canonical = tuple  # (layer: Optional[int], name: str, expert: Optional[int])

_PER_LAYER = re.compile(r"^(module\.)?decoder\.layers\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^(module\.)?decoder\.layers\.(.+)$")


def is_extra_state(key: str) -> bool:
    """A module's ``_extra_state`` entry (``..._extra_state``, ``..._extra_state1``, DCP's ``.../shard_...``)."""
    return "._extra_state" in key or key.startswith("_extra_state")


def canonical_key(key: str) -> str:
    """``key`` in the local spec's spelling, without NeMo's ``module.`` prefix in front.

    Renames the TE spec's MoE norm anywhere in the key, so an optimizer state's key (which
    embeds the parameter's) maps the same way as the parameter's.
    """
    key = key[len(NEMO_PREFIX):] if key.startswith(NEMO_PREFIX) else key
    return _TE_NORM_SEGMENT.sub(lambda m: m.group(1) + LOCAL_SPEC_KEYS_MAP[MOE_NORM_MODULE], key)


def local_module_name(name: str) -> str:
    """The local spec's state_dict (module) name of canonical name ``name`` (its keys map inverted)."""
    for module, saved in LOCAL_SPEC_KEYS_MAP.items():
        if name.startswith(saved):
            return module + name[len(saved):]
    return name


def is_model_key(key: str) -> bool:
    """A GPTModel weight (with or without ``module.``), not an optimizer state, RNG state or ``_extra_state``."""
    return canonical_key(key).startswith(_MODEL_ROOTS) and not is_extra_state(key)


def key_prefix(keys: Iterable[str]) -> str:
    """The prefix a checkpoint puts before megatron's model keys: '' (megatron-core) or 'module.' (NeMo 2)."""
    return NEMO_PREFIX if any(k.startswith(NEMO_PREFIX + root) for k in keys for root in _MODEL_ROOTS) else ""


def layer_naming_of_keys(keys: Iterable[str]) -> str:
    """:data:`TE_NAMES` when an MoE layer's norm is saved under the TE spec's name, else :data:`LOCAL_NAMES`
    (a dense model is named alike under both specs)."""
    return TE_NAMES if any(_TE_NORM_SEGMENT.search(k) and is_model_key(k) for k in keys) else LOCAL_NAMES


def check_layer_naming(naming: str, where: str = "layer naming") -> str:
    from nemo_upcycle.errors import UserError

    if naming not in LAYER_NAMINGS:
        raise UserError(f"{where}={naming!r} is not a layer naming: use one of {', '.join(LAYER_NAMINGS)}")
    return naming


@dataclass(frozen=True)
class MegatronNaming:
    """How a checkpoint names canonical tensors: stacked or per layer, prefix, layer-spec naming.

    ``moe_layers``: the layers whose pre-MLP norm is an MoE layer's (renamed under
    :data:`TE_NAMES`); None: every layer (a stacked MoE model).
    """

    stacked: bool = True
    prefix: str = ""
    layer_naming: str = LOCAL_NAMES
    moe_layers: Optional[frozenset] = frozenset()

    def name(self, layer: Optional[int], name: str) -> str:
        """The name within the layer under this naming (the TE spec's MoE norm, where it applies)."""
        if (name == MLP_NORM and self.layer_naming == TE_NAMES and layer is not None
                and (self.moe_layers is None or layer in self.moe_layers)):
            return TE_MOE_NORM
        return name

    def key(self, layer: Optional[int], name: str, expert: Optional[int]) -> tuple[str, tuple[int, ...]]:
        """(checkpoint key, leading offsets) of canonical tensor (layer, name, expert)."""
        if layer is None:
            return self.prefix + name, ()
        lead = (expert,) if expert is not None else ()
        name = self.name(layer, name)
        if self.stacked:
            return f"{self.prefix}decoder.layers.{name}", (layer,) + lead
        return f"{self.prefix}decoder.layers.{layer}.{name}", lead

    @classmethod
    def of_keys(cls, keys) -> "MegatronNaming":
        """The naming a checkpoint's keys use (each property read from the keys themselves)."""
        keys = list(keys)
        per_layer = any(_PER_LAYER.match(k) for k in keys)
        naming = layer_naming_of_keys(keys)
        moe_layers: Optional[frozenset] = frozenset()
        if naming == TE_NAMES:
            te_layers = {parse_megatron_key(k)[2] for k in keys if _TE_NORM_SEGMENT.search(k) and is_model_key(k)}
            moe_layers = None if -1 in te_layers else frozenset(te_layers)
        return cls(stacked=not per_layer, prefix=key_prefix(keys), layer_naming=naming, moe_layers=moe_layers)

    @classmethod
    def for_model(cls, layer_naming: str, num_experts: int, moe_layers: Iterable[int]) -> "MegatronNaming":
        """The keys the model builder writes: a dense model stacked, an MoE one per layer."""
        return cls(stacked=num_experts == 0, layer_naming=check_layer_naming(layer_naming),
                   moe_layers=frozenset(moe_layers) if num_experts else frozenset())


def parse_megatron_key(key: str) -> tuple[str, bool, int]:
    """(canonical name, whether dim 0 is a stacked layer axis, per-layer index or -1), for a key of either spec.

    Expert tensors have an expert axis after the layer axis (stacked) or first (per layer).
    """
    key = canonical_key(key)
    m = _PER_LAYER.match(key)
    if m:
        return m.group(3), False, int(m.group(2))
    m = _STACKED.match(key)
    if m and m.group(2) != "final_layernorm.weight":
        return m.group(2), True, -1
    return key, False, -1


def stored_key(key: str) -> str:
    """The sharded key of a torch_dist metadata entry (a ShardedObject is stored as ``<key>/shard_<offsets>``)."""
    return key.split("/shard_", 1)[0]


def checkpoint_spellings(requested: Iterable[str], checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Requested key -> the checkpoint's key for the same tensor, where the spellings differ.

    The other layer spec's norm name (also inside the optimizer states' keys, which embed the
    parameter's), and NeMo's leading ``module.`` prefix present on one side only (a model key:
    both sides of an optimizer state are NeMo's). A requested key the checkpoint lacks in
    every spelling is left out (the strict check reports it).
    """
    by_canonical = {canonical_key(k): k for k in map(stored_key, checkpoint_keys)}
    out = {}
    for key in requested:
        have = by_canonical.get(canonical_key(key))
        if have is not None and have != key:
            out[key] = have
    return out


@dataclass(frozen=True)
class KeyMismatch:
    """Model keys (in the checkpoint's spelling) one side has and the other lacks."""

    missing: tuple[str, ...]  # the model needs them, the checkpoint lacks them
    unexpected: tuple[str, ...]  # the checkpoint holds them, the model has no such tensor

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected)

    def describe(self, limit: int = 8) -> str:
        lines = []
        for what, keys in (("missing from the checkpoint", self.missing),
                           ("in the checkpoint but not in the model", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
                lines.append(f"  - {len(keys)} model tensor(s) {what}: {shown}")
        return "\n".join(lines)


def model_key_mismatch(model_keys: Iterable[str], checkpoint_keys: Iterable[str]) -> KeyMismatch:
    """Model weights of the model (every rank's keys, after renaming) vs the checkpoint's, ``_extra_state`` aside."""
    wanted = {canonical_key(k): k for k in model_keys if is_model_key(k)}
    stored = {canonical_key(k): k for k in map(stored_key, checkpoint_keys) if is_model_key(k)}
    return KeyMismatch(missing=tuple(sorted(wanted[k] for k in wanted.keys() - stored.keys())),
                       unexpected=tuple(sorted(stored[k] for k in stored.keys() - wanted.keys())))


def sharded_items(sharded_state) -> list:
    """Every ShardedTensor, ShardedObject and ShardedTensorFactory of a (nested) sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    kinds = (ShardedTensor, ShardedObject, ShardedTensorFactory)
    return [v for v in nested_values(sharded_state) if isinstance(v, kinds)]


def rename_sharded_keys(sharded_state, renames: Mapping[str, str]) -> int:
    """Give each sharded item its checkpoint key (in place); how many were renamed."""
    renamed = 0
    for item in sharded_items(sharded_state):
        if item.key in renames:
            item.key = renames[item.key]
            renamed += 1
    return renamed


def prefix_sharded_keys(sharded_state, prefix: str):
    """Prepend ``prefix`` to the checkpoint key of every sharded item (in place)."""
    if prefix:
        for item in sharded_items(sharded_state):
            item.key = prefix + item.key
    return sharded_state


def keyed_shapes(canonical: Mapping[Canonical, tuple[int, ...]], naming: MegatronNaming) -> dict[str, tuple[int, ...]]:
    """Global shapes of the checkpoint keys holding the canonical tensors under ``naming``."""
    out: dict[str, tuple[int, ...]] = {}
    lead_max: dict[str, list[int]] = {}
    for (layer, name, expert), shape in canonical.items():
        key, lead = naming.key(layer, name, expert)
        have = lead_max.setdefault(key, [0] * len(lead))
        for i, v in enumerate(lead):
            have[i] = max(have[i], v + 1)
        out[key] = shape
    return {key: tuple(lead_max[key]) + tuple(shape) for key, shape in out.items()}


def split_request(key: str, offsets: tuple[int, ...], shape: tuple[int, ...]):
    """Split a request on a checkpoint key into requests on canonical tensors.

    Yields (canonical, index into the request's target for the leading axes, offsets
    within the canonical tensor, shape within the canonical tensor).
    """
    import itertools

    name, stacked, layer = parse_megatron_key(key)
    if layer < 0 and not stacked:
        yield (None, name, None), (), tuple(offsets), tuple(shape)
        return
    n_lead = (1 if stacked else 0) + (1 if name in EXPERT_NAMES else 0)
    lead_off, lead_len = offsets[:n_lead], shape[:n_lead]
    ranges = [range(o, o + n) for o, n in zip(lead_off, lead_len)]
    for combo in itertools.product(*ranges):
        idx = tuple(c - o for c, o in zip(combo, lead_off))
        rest = list(combo)
        lay = rest.pop(0) if stacked else layer
        expert = rest.pop(0) if name in EXPERT_NAMES else None
        yield (lay, name, expert), idx, tuple(offsets[n_lead:]), tuple(shape[n_lead:])
