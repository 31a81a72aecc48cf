"""Export a megatron-core MoE (or dense) checkpoint to a Hugging Face Mixtral (or Llama) folder.

Streaming: the safetensors shards are written by hand (an 8-byte header length, the JSON
header, then each tensor's bytes), so every HF tensor is assembled from its megatron
slices, written and dropped before the next; peak memory is one HF tensor. The source is
anything with the :class:`~nemo_upcycle.upcycle.sources.DenseSource` protocol over
megatron keys: a ``torch_dist`` checkpoint saved at any layout (global keys, stacked or
per layer, with or without ``module.``), or an in-memory model (:class:`ModelSource`).

Only configurations that ``MixtralForCausalLM`` computes exactly are exported: Mixtral
routes top-k then softmax over the chosen experts' logits, with every layer an MoE layer,
no expert bias and no token dropping. Anything else is refused with the reason, rather
than writing a folder that loads but computes something else.
"""
from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.architecture import rope_scaling_of
from nemo_upcycle.checkpoint.hf_llama import (
    LlamaShape,
    MegatronNaming,
    canonical_shapes,
    hf_shapes,
    keyed_shapes,
    llama_boxes,
)
from nemo_upcycle.checkpoint.tokenizer_files import TOKENIZER_FILES
from nemo_upcycle.errors import UserError
from nemo_upcycle.upcycle.routers import router_row
from nemo_upcycle.upcycle.sources import ReadStats, SliceRequest, narrow_tensor_by_index
from nemo_upcycle.upcycle.spec import UpcycleSpec

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class ExportError(UserError):
    """The checkpoint or configuration cannot be exported; the message says why and what to do."""


def unsupported_reasons(cfg: Any) -> list[str]:
    """Why ``MixtralForCausalLM`` would not compute what this MoE config computes (empty: it would)."""
    from nemo_upcycle.config.moe_layers import moe_layer_indices

    moe, router, model = cfg.moe, cfg.router, cfg.model
    family = getattr(model, "family", "llama")
    if family not in ("llama", "mistral"):
        target = {"qwen2": "Qwen2-MoE", "qwen3": "Qwen3-MoE"}.get(family, "no Hugging Face MoE architecture")
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


class ModelSource:
    """This rank's model chunks as a megatron-keyed source (the export of a model in memory)."""

    def __init__(self, chunks: list):
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        self.path = Path("<model in memory>")
        self._chunks: dict[str, list[tuple[tuple, torch.Tensor]]] = {}
        self._shapes: dict[str, tuple] = {}

        def add(sh):
            if isinstance(sh, ShardedTensorFactory):
                for inner in nested_values(sh.build()):
                    add(inner)
                return
            if not isinstance(sh, ShardedTensor):
                return
            data = sh.data.detach()
            for _ in range(sh.prepend_axis_num):
                data = data.unsqueeze(0)
            self._chunks.setdefault(sh.key, []).append((tuple(sh.global_offset), data))
            self._shapes[sh.key] = tuple(sh.global_shape)

        for chunk in chunks:
            for sh in nested_values(chunk.sharded_state_dict()):
                add(sh)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self) -> torch.dtype:
        return next(iter(self._chunks.values()))[0][1].dtype

    def read(self, requests: list[SliceRequest]) -> ReadStats:
        stats = ReadStats()
        with torch.no_grad():
            for req in requests:
                want_lo, want_shape = req.offsets, req.target.shape
                for offsets, data in self._chunks[req.key]:
                    lo = [max(a, b) for a, b in zip(want_lo, offsets)]
                    hi = [min(a + n, b + m) for a, n, b, m in zip(want_lo, want_shape, offsets, data.shape)]
                    if any(h <= low for low, h in zip(lo, hi)):
                        continue
                    sizes = [h - low for low, h in zip(lo, hi)]
                    src = narrow_tensor_by_index(data, [low - o for low, o in zip(lo, offsets)], sizes)
                    dst = narrow_tensor_by_index(req.target, [low - o for low, o in zip(lo, want_lo)], sizes)
                    dst.copy_(src)
                    stats.bytes_read += src.numel() * src.element_size()
                    stats.chunks_read += 1
                stats.elements_delivered += req.numel
                stats.keys.add(req.key)
        return stats


def source_dtype(source) -> torch.dtype:
    if hasattr(source, "dtype"):
        return source.dtype()
    md = source.metadata.state_dict_metadata
    for key in sorted(source.tensor_shapes()):
        return md[key].properties.dtype
    return torch.float32


class _ShardWriter:
    """One safetensors file, written tensor by tensor after its header."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.expected = {name: header[name] for name, _, _ in entries}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)
        self.data_start = 8 + len(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self.expected[name]
        assert self.file.tell() - self.data_start == info["data_offsets"][0], name
        flat = tensor.contiguous().view(-1).view(torch.uint8)
        self.file.write(memoryview(flat.numpy()))

    def close(self) -> None:
        self.file.close()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shards(shapes: dict[str, tuple], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    size = torch.empty((), dtype=dtype).element_size()
    shards, current, current_bytes = [], [], 0
    for name, shape in shapes.items():
        n = _numel(shape) * size
        if current and current_bytes + n > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += n
    if current:
        shards.append(current)
    return shards


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
    """Write ``source`` (megatron keys) as an HF Mixtral/Llama folder at ``output_dir``."""
    from tqdm import tqdm

    started = time.perf_counter()
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ExportError(f"output_dir {output_dir} already exists; choose another or pass overwrite=true")
    check_exportable(cfg)
    shape = llama_shape(cfg)
    boxes = llama_boxes(shape)
    shapes = hf_shapes(shape)
    have = source.tensor_shapes()
    naming = MegatronNaming.of_keys(have)
    by_hf: dict[str, list] = {}
    for b in boxes:
        key, lead = naming.key(*b.target)
        by_hf.setdefault(b.hf, []).append((b, key, lead))
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
    dtype = dtype or source_dtype(source)
    if dtype not in _ST_NAMES:
        raise ExportError(f"dtype {dtype} cannot be exported; use float32, bfloat16 or float16")
    dense_config = None
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "config.json").is_file():
        dense_config = json.loads((Path(tokenizer_dir) / "config.json").read_text())

    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = plan_shards(shapes, dtype, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    total_bytes = 0
    bar = tqdm(total=len(shapes), desc="export", unit="tensor", disable=not progress)
    try:
        weight_map = {}
        for file_name, members in zip(names, shards):
            writer = _ShardWriter(tmp / file_name, [(n, shapes[n], dtype) for n in members])
            try:
                for name in members:
                    out = torch.empty(shapes[name], dtype=dtype)
                    requests = []
                    for b, key, lead in by_hf[name]:
                        view = out.narrow(0, b.hf_row, b.rows)
                        for _ in lead:
                            view = view.unsqueeze(0)
                        offsets = tuple(lead) + (b.mg_row,) + (0,) * (out.dim() - 1)
                        requests.append(SliceRequest(key, offsets, view))
                    source.read(requests)
                    writer.write(name, out)
                    total_bytes += out.numel() * out.element_size()
                    weight_map[name] = file_name
                    del out, requests
                    bar.update(1)
            finally:
                writer.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, dense_config), indent=2))
        copied = []
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
                    copied.append(fname)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return {
        "architecture": "MixtralForCausalLM" if shape.num_experts else "LlamaForCausalLM",
        "tensors": len(shapes),
        "shards": len(shards),
        "bytes": total_bytes,
        "tokenizer_files": copied,
        "seconds": time.perf_counter() - started,
    }
