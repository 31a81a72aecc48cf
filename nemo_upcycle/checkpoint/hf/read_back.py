"""Hugging Face MoE folders read back into megatron-core MoE checkpoints (``import_dense``).

The formats nemo-upcycle exports (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4-MoE) are each a dense
family's attention plus MoE FFNs; this module says which family, which layers are MoE layers,
the expert width and the megatron-core settings (experts, top-k, granularity, router, shared
expert) whose checkpoint layout holds the folder's tensors. ``config.json`` states all but the
shared expert, which its tensors decide (:func:`read_shared_expert`): a zero down projection in
every MoE layer is an inert one (none in megatron-core), a live one is megatron-core's
``moe.shared_expert`` as hf/moe_layouts.py writes it. A folder with something megatron-core's
MoE here cannot hold (a shared expert of another width, a routing with no router row) is refused.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from nemo_upcycle.checkpoint.architecture import stated_by_hf_config
from nemo_upcycle.checkpoint.hf.export_targets import MOE_TARGETS, moe_layout
from nemo_upcycle.checkpoint.hf.moe_layouts import SHARED_EXPERT_RECORD, MoeFolderError, MoeReadBack


def read_back(config: dict, where: str) -> tuple[dict, MoeReadBack]:
    """(the dense family's config.json to state the architecture from, the MoE settings): the
    target's own reading (its row in checkpoint/hf/export_targets.py), then the granularity."""
    layers = int(config["num_hidden_layers"])
    config, moe = MOE_TARGETS[config["model_type"]].read_back(config, where)
    width, dense_width = moe.expert_ffn_hidden_size, moe.dense_ffn_hidden_size
    if len(moe.moe_layers) < layers:
        # The layers left dense keep the dense width F; megatron-core's experts are F/G wide
        # (check_counts, once the shared expert is known, checks G, or G - S, divides the experts).
        if dense_width % width:
            raise MoeFolderError(
                f"{where}: moe_intermediate_size={width} does not divide intermediate_size={dense_width}; "
                "megatron-core's MoE here cannot hold these dense and expert widths together")
        moe.granularity = dense_width // width
    else:
        moe.dense_ffn_hidden_size = width  # no layer is dense: the experts' width is the model's FFN width
    return dict(config, intermediate_size=moe.dense_ffn_hidden_size), moe


def stated_by_hf_folder_config(config: dict, where: str = "config.json") -> tuple[dict, Optional[MoeReadBack]]:
    """(the architecture, its MoE settings or None) of a Hugging Face folder's ``config.json``: a
    dense family, or an MoE type nemo-upcycle writes, read as its dense family plus experts."""
    moe = None
    if config.get("model_type") in MOE_TARGETS:
        config, moe = read_back(config, where)
    return stated_by_hf_config(config, where), moe


def check_counts(moe: MoeReadBack, where) -> None:
    """The routed experts and top-k are whole groups of G (G - S beside S shared slices) experts of
    width F/G, as megatron-core's granular experts are (upcycle/spec.py)."""
    groups = moe.routed_slices
    if moe.num_experts % groups or moe.topk % groups:
        of = (f"G - S = {moe.granularity} - {moe.shared_slices} routed slices" if moe.shared_mode == "slices"
              else f"granularity G = {moe.granularity}")
        raise MoeFolderError(
            f"{where}: num_experts={moe.num_experts} and num_experts_per_tok={moe.topk} are not multiples of "
            f"{groups} ({of}, from intermediate_size={moe.dense_ffn_hidden_size} / moe_intermediate_size="
            f"{moe.expert_ffn_hidden_size}); megatron-core's MoE here cannot hold these widths and counts together")


def _tensor(folder, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(folder.tensors[name][0]), framework="pt") as f:
        return f.get_tensor(name)


def read_shared_expert(folder, shape, moe: MoeReadBack, config: dict, where) -> MoeReadBack:
    """``moe`` with the folder's shared expert, from its tensors (read one at a time, before
    anything is written): inert in every MoE layer (zero down projection, checked as
    :func:`check_inert`), or live in every one, megatron-core's ``moe.shared_expert``:

    * its width says the mode: intermediate_size (the dense FFN's, F) is a copy, S times
      moe_intermediate_size (F/G) with S < G is S slices;
    * gated on Qwen2-MoE, unless ``config.json`` records the model as ungated and the gate is
      zero (the fixed gate of hf/moe_layouts.py: its down projection is halved back on import).
      A gate trained off zero after the export is read as the gated model the folder computes.
    """
    lay = moe_layout(shape.moe_layout)
    downs = [lay.shared_proj(f"model.layers.{i}.", lay.down) for i in shape.moe_layers] if lay.shared else []
    live = [name for name in downs if bool(_tensor(folder, name).any())]
    if not live:
        check_inert(folder, shape, where)
        check_counts(moe, where)
        return moe
    if len(live) < len(downs):
        raise MoeFolderError(
            f"{where} has a live shared expert in {len(live)} of its {len(downs)} MoE layers ({live[0]} non-zero, "
            f"{next(n for n in downs if n not in live)} zero): megatron-core's MoE here has a shared expert in every "
            "MoE layer or in none")
    dense, width, shared = int(config["intermediate_size"]), moe.expert_ffn_hidden_size, moe.shared_expert_width
    granularity = dense // width if dense % width == 0 else 0
    if granularity and shared == dense:
        moe = replace(moe, shared_mode="copy", shared_slices=0)
    elif granularity and shared % width == 0 and 0 < shared // width < granularity:
        moe = replace(moe, shared_mode="slices", shared_slices=shared // width)
    else:
        raise MoeFolderError(
            f"{where} has a live shared expert of width {shared}: megatron-core's shared expert here is the dense "
            f"FFN (intermediate_size={dense}) or S < G of its G slices of the routed width (moe_intermediate_size="
            f"{width}), so this model cannot be imported exactly")
    moe = replace(moe, granularity=granularity, dense_ffn_hidden_size=dense,
                  shared_gate=lay.shared_gate is not None and not _fixed_gate(folder, shape, config))
    check_counts(moe, where)
    return moe


def _fixed_gate(folder, shape, config: dict) -> bool:
    """A Qwen2-MoE folder's shared expert gate is the fixed zero of an ungated model (hf/moe_layouts.py)."""
    record = (config.get("nemo_upcycle") or {}).get(SHARED_EXPERT_RECORD) or {}
    if record.get("gate", True):
        return False
    lay = moe_layout(shape.moe_layout)
    return not any(bool(_tensor(folder, lay.shared_gate_name(f"model.layers.{i}.")).any()) for i in shape.moe_layers)


def check_inert(folder, shape, where) -> None:
    """Refuse a folder whose inert shared expert would contribute after all.

    A zero down projection makes the shared expert's output exactly 0 for finite inputs; its
    other tensors must be finite (0 times inf is NaN). The tensors are read one at a time.
    """
    from nemo_upcycle.checkpoint.hf.mapping import inert_shapes, zero_tensors

    zeros, live = set(zero_tensors(shape)), []
    for name in inert_shapes(shape):
        t = _tensor(folder, name)
        if not bool(torch.isfinite(t).all()) or (name in zeros and bool(t.any())):
            live.append(name)
    if live:
        raise MoeFolderError(
            f"{where} has a live shared expert ({', '.join(live[:3])}{' ...' if len(live) > 3 else ''} "
            "not finite, beside a zero down projection): it does not add exactly 0, so this model cannot be "
            "imported exactly")
