"""Export a megatron-core MoE (or dense) checkpoint to a Hugging Face folder that computes it exactly.

Streaming: every HF tensor is assembled from its megatron slices, written and dropped
before the next (:mod:`nemo_upcycle.checkpoint.convert.safetensors_writer`); peak memory is one HF
tensor. The source is anything with the :class:`~nemo_upcycle.checkpoint.sources.slices.DenseSource`
protocol over megatron keys: a ``torch_dist`` checkpoint saved at any layout (global keys,
stacked or per layer, with or without ``module.``, under either layer spec's names:
:mod:`nemo_upcycle.model.megatron_keys`), or an in-memory model
(:class:`~nemo_upcycle.checkpoint.sources.in_memory.ModelSource`).

The target (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4-MoE; Llama, Qwen2, Qwen3 for a dense model) is the
one whose transformers code computes this configuration exactly
(:mod:`nemo_upcycle.checkpoint.hf.export_targets`); a configuration none computes is refused
with the reasons, rather than writing a folder that loads but computes something else.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.checkpoint.hf.export_targets import ExportError, ExportTarget, choose_target
from nemo_upcycle.checkpoint.hf.generation_config import stated_token_ids
from nemo_upcycle.checkpoint.hf.config_json import hf_config
from nemo_upcycle.checkpoint.hf.mapping import (LlamaShape, canonical_shapes, hf_factors, hf_shapes, inert_shapes,
                                                 llama_boxes)
from nemo_upcycle.model.megatron_keys import MegatronNaming, is_model_key, keyed_shapes
from nemo_upcycle.checkpoint.convert.safetensors_writer import ST_DTYPE_NAMES, write_shards
from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_files
from nemo_upcycle.checkpoint.sources.slices import SliceRequest
from nemo_upcycle.upcycle.spec import UpcycleSpec
from nemo_upcycle.util.atomic import refuse_existing, write_folder_atomic

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def check_exportable(cfg: Any) -> ExportTarget:
    """The Hugging Face target that computes ``cfg`` exactly; refused (no weight read) when none does."""
    return choose_target(cfg)


def llama_shape(cfg: Any, target: Optional[ExportTarget] = None) -> LlamaShape:
    """The HF shape of the model in ``cfg`` written as ``target`` (default: the one export picks)."""
    spec = UpcycleSpec.of(cfg)
    moe_layout = (target or choose_target(cfg)).model_type if spec.is_moe else None
    return LlamaShape.of(Architecture.of(cfg.model), spec, moe_layout)


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
    """Every megatron tensor the HF folder is assembled from exists with the shape the config implies,
    and the checkpoint holds no model weight beyond them (one the export would silently drop)."""
    problems = []
    wanted = keyed_shapes(canonical_shapes(boxes, shapes), naming)
    for key, want in wanted.items():
        if key not in have:
            problems.append(f"the checkpoint has no tensor {key!r}")
        elif tuple(have[key]) != tuple(want):
            problems.append(f"{key} has shape {list(have[key])} in the checkpoint, the config implies {list(want)}")
    problems += [f"the checkpoint holds {key!r}, which the config has no tensor for"
                 for key in sorted(have) if is_model_key(key) and key not in wanted]
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
    """Write ``source`` (megatron keys) as the HF folder of the exact target (hf/export_targets.py).

    Every check comes before the first byte is written; the folder appears only when complete.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    refuse_existing(output_dir, overwrite, ExportError)
    target = check_exportable(cfg)
    shape = llama_shape(cfg, target)
    boxes, shapes, inert = llama_boxes(shape), hf_shapes(shape), inert_shapes(shape)
    have = source.tensor_shapes()
    naming = MegatronNaming.of_keys(have)
    check_source_matches(have, cfg, boxes, shapes, naming)
    dtype = dtype or source_dtype(source)
    if dtype not in ST_DTYPE_NAMES:
        raise ExportError(f"dtype {dtype} cannot be exported; use float32, bfloat16 or float16")
    token_ids = stated_token_ids(tokenizer_dir)
    slices = slices_by_hf_tensor(boxes, naming)
    scaled = hf_factors(shape)
    factors = {b.hf: scaled[b.target] for b in boxes if b.target in scaled}

    def tensor(name: str) -> torch.Tensor:
        if name in inert:  # required by the architecture, not in the model: zeros (hf/moe_layouts.py)
            return torch.zeros(shapes[name], dtype=dtype)
        out = read_hf_tensor(source, slices[name], shapes[name], dtype)
        if name in factors:  # a power of two: exact unless it overflows
            out.mul_(factors[name])
            if not bool(torch.isfinite(out).all()):
                raise ExportError(f"{name} overflows {dtype} when scaled by {factors[name]} "
                                  "(hf/moe_layouts.py); export in a wider dtype")
        return out

    def write(folder: Path) -> tuple[int, int, list[str]]:
        folder.mkdir(parents=True)
        shards, total_bytes = write_shards(folder, shapes, dtype, max_shard_bytes, tensor, progress)
        (folder / "config.json").write_text(json.dumps(hf_config(cfg, target, dtype, token_ids), indent=2))
        return shards, total_bytes, copy_tokenizer(tokenizer_dir, folder)

    shards, total_bytes, copied = write_folder_atomic(output_dir, write)
    return {
        "architecture": target.architecture,
        "tensors": len(shapes),
        "shards": shards,
        "bytes": total_bytes,
        "tokenizer_files": copied,
        "seconds": time.perf_counter() - started,
    }
