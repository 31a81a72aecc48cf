"""Export a megatron-core MoE (or dense) checkpoint to a Hugging Face Mixtral (or Llama) folder.

Streaming: every HF tensor is assembled from its megatron slices, written and dropped
before the next (:mod:`nemo_upcycle.checkpoint.safetensors_writer`); peak memory is one HF
tensor. The source is anything with the :class:`~nemo_upcycle.upcycle.sources.DenseSource`
protocol over megatron keys: a ``torch_dist`` checkpoint saved at any layout (global keys,
stacked or per layer, with or without ``module.``), or an in-memory model
(:class:`~nemo_upcycle.checkpoint.model_source.ModelSource`).

Only configurations that ``MixtralForCausalLM`` computes exactly are exported: Mixtral
routes top-k then softmax over the chosen experts' logits, with every layer an MoE layer,
no expert bias and no token dropping. Anything else is refused with the reason, rather
than writing a folder that loads but computes something else.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.architecture import FAMILIES, rope_scaling_of
from nemo_upcycle.checkpoint.hf_llama import (
    LlamaShape,
    MegatronNaming,
    canonical_shapes,
    hf_shapes,
    keyed_shapes,
    llama_boxes,
)
from nemo_upcycle.checkpoint.safetensors_writer import ST_DTYPE_NAMES, write_shards
from nemo_upcycle.checkpoint.tokenizer_files import tokenizer_files
from nemo_upcycle.errors import UserError
from nemo_upcycle.upcycle.routers import router_row
from nemo_upcycle.upcycle.sources import SliceRequest
from nemo_upcycle.upcycle.spec import UpcycleSpec
from nemo_upcycle.util.atomic import refuse_existing, write_folder_atomic

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class ExportError(UserError):
    """The checkpoint or configuration cannot be exported; the message says why and what to do."""


def unsupported_reasons(cfg: Any) -> list[str]:
    """Why ``MixtralForCausalLM`` would not compute what this MoE config computes (empty: it would)."""
    from nemo_upcycle.config.moe_layers import moe_layer_indices

    moe, router, model = cfg.moe, cfg.router, cfg.model
    family = getattr(model, "family", "llama")
    known = FAMILIES.get(family)
    if known is None or not known.exported:
        target = known.moe_architecture if known else "no Hugging Face MoE architecture"
        return [f"model.family={family}: its attention ({'q/k/v biases' if model.qkv_bias else 'q/k norms'}) "
                f"does not fit Mixtral or Llama; its export target ({target}) is not written yet"]
    if moe.num_experts == 0:
        return []
    reasons = []
    row = router_row(router.type)
    if row.export_target != "mixtral":
        reasons.append(f"router.type={router.type}: {row.export_refusal}")
    layers = moe_layer_indices(moe.layers, model.num_layers)
    if len(layers) != model.num_layers:
        dense = sorted(set(range(model.num_layers)) - set(layers))
        reasons.append(
            f"moe.layers={moe.layers}: layers {dense} are left dense; Mixtral has an MoE FFN in every layer"
        )
    if moe.capacity_factor is not None:
        reasons.append(
            f"moe.capacity_factor={moe.capacity_factor}: tokens beyond capacity are dropped; Mixtral is dropless"
        )
    return reasons


def check_exportable(cfg: Any) -> None:
    reasons = unsupported_reasons(cfg)
    if reasons:
        hint = ("Qwen2/Qwen3 models are refused until their Qwen2-MoE/Qwen3-MoE export exists."
                if reasons[0].startswith("model.family=") else
                "Export a model trained with router.type=topk_softmax, moe.layers=all and "
                "moe.capacity_factor=null (the defaults).")
        raise ExportError(
            "this MoE configuration has no exact Hugging Face Mixtral equivalent, so no folder was written:\n"
            + "\n".join(f"  - {r}" for r in reasons) + "\n" + hint
        )


def llama_shape(cfg: Any) -> LlamaShape:
    """The HF shape of the model in ``cfg``; granular experts become E*G Mixtral experts of width F/G."""
    spec = UpcycleSpec.of(cfg)
    shape = LlamaShape.of_model(cfg.model, num_experts=spec.num_experts, moe_layers=list(spec.moe_layers))
    if spec.is_moe:
        shape.ffn_hidden_size = spec.expert_ffn_hidden_size
    return shape


def hf_config(cfg: Any, dtype: torch.dtype, dense_config: Optional[dict] = None) -> dict:
    m, moe = cfg.model, cfg.moe
    shape = llama_shape(cfg)
    out = {
        "hidden_size": m.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": float(m.norm_eps),
        "rope_theta": float(m.rotary_base),
        "rope_scaling": rope_scaling_of(m),
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if dense_config and dense_config.get(key) is not None:
            out[key] = dense_config[key]
    if shape.num_experts:
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=shape.num_experts,
            num_experts_per_tok=UpcycleSpec.of(cfg).topk,
            output_router_logits=False,
            router_aux_loss_coef=float(cfg.router.aux_loss_coeff or 0.0),
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    else:
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False)
    # Where the configuration came from, for people reading config.json.
    out["nemo_upcycle"] = {
        "model": m.name, "moe": moe.name, "num_experts": moe.num_experts, "topk": moe.topk,
        "granularity": moe.granularity, "router": cfg.router.type, "family": getattr(m, "family", "llama"),
    }
    return out


def source_dtype(source) -> torch.dtype:
    if hasattr(source, "dtype"):
        return source.dtype()
    md = source.metadata.state_dict_metadata
    for key in sorted(source.tensor_shapes()):
        return md[key].properties.dtype
    return torch.float32


def slices_by_hf_tensor(boxes: list, naming: MegatronNaming) -> dict[str, list]:
    """Each HF tensor's row boxes, with the megatron key and leading (layer, expert) index each reads."""
    by_hf: dict[str, list] = {}
    for b in boxes:
        key, lead = naming.key(*b.target)
        by_hf.setdefault(b.hf, []).append((b, key, lead))
    return by_hf


def check_source_matches(have: dict[str, tuple], cfg: Any, boxes: list, shapes: dict[str, tuple],
                         naming: MegatronNaming) -> None:
    """Every megatron tensor the HF folder is assembled from exists with the shape the config implies."""
    problems = []
    for key, want in keyed_shapes(canonical_shapes(boxes, shapes), naming).items():
        if key not in have:
            problems.append(f"the checkpoint has no tensor {key!r}")
        elif tuple(have[key]) != tuple(want):
            problems.append(f"{key} has shape {list(have[key])} in the checkpoint, the config implies {list(want)}")
    if problems:
        uniq = list(dict.fromkeys(problems))
        raise ExportError(
            f"the checkpoint does not match the model/moe config (model={cfg.model.name}, moe={cfg.moe.name}, "
            f"granularity={cfg.moe.granularity}):\n" + "\n".join(f"  - {p}" for p in uniq[:10])
            + ("\n  ..." if len(uniq) > 10 else "")
        )


def read_hf_tensor(source, slices: list, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """One HF tensor, filled in one read from the megatron slices its row boxes name."""
    out = torch.empty(shape, dtype=dtype)
    requests = []
    for b, key, lead in slices:
        view = out.narrow(0, b.hf_row, b.rows)
        for _ in lead:
            view = view.unsqueeze(0)
        offsets = tuple(lead) + (b.mg_row,) + (0,) * (out.dim() - 1)
        requests.append(SliceRequest(key, offsets, view))
    source.read(requests)
    return out


def dense_config_beside(tokenizer_dir: Optional[Path]) -> Optional[dict]:
    """The dense model's own config.json when the tokenizer is its HF folder: its token ids are kept."""
    path = Path(tokenizer_dir) / "config.json" if tokenizer_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def copy_tokenizer(tokenizer_dir: Optional[Path], folder: Path) -> list[str]:
    """Copy the tokenizer files (not the weights beside them); their names."""
    if tokenizer_dir is None:
        return []
    copied = []
    for src in tokenizer_files(Path(tokenizer_dir)):
        shutil.copy2(src, folder / src.name)
        copied.append(src.name)
    return copied


def export_hf(
    source,
    cfg: Any,
    output_dir: Path,
    tokenizer_dir: Optional[Path] = None,
    overwrite: bool = False,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> dict:
    """Write ``source`` (megatron keys) as an HF Mixtral/Llama folder at ``output_dir``.

    Every check comes before the first byte is written; the folder appears only when complete.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    refuse_existing(output_dir, overwrite, ExportError)
    check_exportable(cfg)
    shape = llama_shape(cfg)
    boxes, shapes = llama_boxes(shape), hf_shapes(shape)
    have = source.tensor_shapes()
    naming = MegatronNaming.of_keys(have)
    check_source_matches(have, cfg, boxes, shapes, naming)
    dtype = dtype or source_dtype(source)
    if dtype not in ST_DTYPE_NAMES:
        raise ExportError(f"dtype {dtype} cannot be exported; use float32, bfloat16 or float16")
    dense_config = dense_config_beside(tokenizer_dir)
    slices = slices_by_hf_tensor(boxes, naming)

    def write(folder: Path) -> tuple[int, int, list[str]]:
        folder.mkdir(parents=True)
        shards, total_bytes = write_shards(
            folder, shapes, dtype, max_shard_bytes,
            lambda name: read_hf_tensor(source, slices[name], shapes[name], dtype), progress)
        (folder / "config.json").write_text(json.dumps(hf_config(cfg, dtype, dense_config), indent=2))
        return shards, total_bytes, copy_tokenizer(tokenizer_dir, folder)

    shards, total_bytes, copied = write_folder_atomic(output_dir, write)
    return {
        "architecture": "MixtralForCausalLM" if shape.num_experts else "LlamaForCausalLM",
        "tensors": len(shapes),
        "shards": shards,
        "bytes": total_bytes,
        "tokenizer_files": copied,
        "seconds": time.perf_counter() - started,
    }
