"""Import a Llama-architecture model (HF folder or GGUF) into a torch_dist checkpoint, streaming.

The result is a megatron-core distributed checkpoint, the format online upcycling reads
and NeMo 2 / Megatron use. A dense Llama becomes a dense GPTModel checkpoint; an MoE
folder (e.g. one written by ``nemo_upcycle.export_hf``) becomes an MoE GPTModel
checkpoint. No model is instantiated: the checkpoint layout comes from a model built on
the ``meta`` device, and each chunk (one layer's tensor) is read from the source and
written before the next is read, so peak memory stays near the largest tensor. It is
written under a temporary name and renamed when complete, so a failed import never leaves
a folder that looks finished.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from nemo_upcycle.checkpoint.hf.mapping import LlamaShape, hf_factors
from nemo_upcycle.checkpoint.hf.moe_layouts import INERT, MoeFolderError, MoeReadBack
from nemo_upcycle.checkpoint.hf.read_back import read_shared_expert, stated_by_hf_folder_config
from nemo_upcycle.checkpoint.sources.torch_dist import MODEL_INFO
from nemo_upcycle.checkpoint.hf.tokenizer_files import is_gguf_copy
from nemo_upcycle.errors import UserError
from nemo_upcycle.util.atomic import refuse_existing, write_folder_atomic


class ImportError_(UserError):
    """A source that cannot be imported; the message names the problem and the fix."""


def template_overrides(stated: dict, shape: LlamaShape, topk: int = 2, moe: Optional[MoeReadBack] = None) -> list[str]:
    """Hydra overrides of the model whose checkpoint layout the import writes.

    ``moe`` (an MoE folder's settings) gives the granularity, router and shared expert; without
    it the MoE is E experts of width ``shape.ffn_hidden_size`` routed top-``topk`` (G = 1).
    """
    base = ["model=auto", "model.name=import", "model.dense_checkpoint=none",
            *(f"model.{k}={'null' if v is None else v}" for k, v in stated.items())]
    if shape.num_experts == 0:
        return base + ["moe=dense"]
    moe = moe or MoeReadBack(shape.num_experts, topk)
    experts, coarse_topk = moe.coarse()
    layers = "all" if len(shape.moe_layers) == shape.num_layers else "[" + ",".join(map(str, shape.moe_layers)) + "]"
    return base + ["moe=e8t2", f"moe.num_experts={experts}", f"moe.topk={coarse_topk}",
                   f"moe.granularity={moe.granularity}", f"moe.layers={layers}", f"router={moe.router}",
                   *moe.shared_overrides()]


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    refuse_existing(output_dir, overwrite, ImportError_)


def import_source(source, stated: dict, output_dir: Path, overwrite: bool = False,
                  dtype: Optional[torch.dtype] = None, progress: bool = True, topk: int = 2,
                  moe: Optional[MoeReadBack] = None,
                  info: Optional[dict] = None) -> dict:
    """Write the torch_dist checkpoint of ``source`` (a :class:`MappedHFSource`)."""
    from nemo_upcycle.checkpoint.convert.dist_writer import meta_model_template, write_streaming

    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    tensors, objects = meta_model_template(template_overrides(stated, source.shape, topk, moe))
    have = source.tensor_shapes()
    for t in tensors:
        if t.key not in have or tuple(have[t.key]) != tuple(t.global_shape):
            raise ImportError_(
                f"{t.key}: the model needs global shape {list(t.global_shape)}, the source has "
                f"{list(have[t.key]) if t.key in have else 'no such tensor'}"
            )
    dtype = dtype or source.dtype()
    if not dtype.is_floating_point:
        raise ImportError_(f"the source's weights are {dtype}, not floating point")
    model_info = dict(stated, num_experts=source.shape.num_experts, moe_layers=source.shape.moe_layers,
                      source=str(source.path), dtype=str(dtype).replace("torch.", ""), **(info or {}))

    # Tensors the folder stores times a power of two (hf/mapping.py hf_factors): divided back, exactly.
    factors = {}
    for target, factor in hf_factors(source.shape).items():
        key, lead = source.naming.key(*target)
        assert not lead, key  # the shared expert's tensors are per layer (an MoE model's keys)
        factors[key] = factor

    def provide(key, offsets, shape):
        out = source.get(key, offsets, shape, dtype)
        return out / factors[key] if key in factors else out

    def write(target: Path) -> dict:
        return write_streaming(tensors, objects, provide, target, dtype=dtype,
                               extra_files={MODEL_INFO: json.dumps(model_info, indent=2)},
                               progress=progress, desc="import")

    # Staged beside output_dir: overwrite=true replaces the old checkpoint only once the new one is complete.
    return write_folder_atomic(output_dir, write)


def import_hf_folder(folder: Path, output_dir: Path, overwrite: bool = False,
                     dtype: Optional[torch.dtype] = None, progress: bool = True) -> dict:
    from nemo_upcycle.checkpoint.sources.hf_safetensors import HFFormatError, SafetensorsSource

    check_output_dir(Path(output_dir), overwrite)
    try:
        source = SafetensorsSource(folder)
    except HFFormatError as err:
        raise ImportError_(str(err)) from None
    config, stated = source.folder.config, source.folder.stated
    moe = None
    if source.shape.num_experts:
        _, moe = stated_by_hf_folder_config(config, str(source.path / "config.json"))
        try:  # the shared expert's tensors decide it, before anything is written
            moe = read_shared_expert(source.folder, source.shape, moe, config, source.path)
        except MoeFolderError as err:
            raise ImportError_(str(err)) from None
        if moe.shared_expert != INERT:
            # Live or inert, the tensors have the same names and shapes (checked already):
            # config.json cannot say which, the tensors did (read_shared_expert).
            source = SafetensorsSource(folder, shape=replace(source.shape, shared_expert=moe.shared_expert))
        stated = dict(stated, ffn_hidden_size=moe.dense_ffn_hidden_size)  # F: a shared copy's width
    topk = int(config.get("num_experts_per_tok", 2) or 2)
    return import_source(source, stated, output_dir, overwrite, dtype, progress, topk, moe)


def import_gguf(gguf_file: Path, output_dir: Path, overwrite: bool = False,
                dtype: Optional[torch.dtype] = torch.float32, progress: bool = True) -> dict:
    from nemo_upcycle.checkpoint.sources.gguf_file import GGUFFormatError, GGUFSource

    check_output_dir(Path(output_dir), overwrite)
    try:
        source = GGUFSource(gguf_file)
    except GGUFFormatError as err:
        raise ImportError_(str(err)) from None
    return import_source(source, source.architecture(), output_dir, overwrite, dtype, progress,
                         info={"gguf_quantisations": source.quantisations()})


def load_gguf_as_hf(gguf_file: Path, hf_out: Optional[Path] = None):
    """Dequantise a GGUF file with transformers; optionally keep a safetensors copy.

    Used for the embedded model's HF copy (135M parameters), which also needs the tokenizer
    transformers rebuilds from the GGUF metadata.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise ImportError_(f"GGUF file {gguf_file} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, torch_dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except (ValueError, NotImplementedError, KeyError) as err:
        raise ImportError_(
            f"transformers cannot dequantise {gguf_file.name}: {err}. Supported GGUF "
            "quantisations are those transformers' GGUF loader reads (F32/F16/BF16, Q4_0, "
            "Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, ...)"
        ) from err
    if hf_out is not None:
        # The weights are dequantised now: the copy must not claim to be GGUF-quantised.
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)

        def save(folder: Path) -> None:
            model.save_pretrained(str(folder), safe_serialization=True)
            tokenizer.save_pretrained(str(folder))
            if is_gguf_copy(folder / "tokenizer.model"):
                (folder / "tokenizer.model").unlink()  # the GGUF file itself; tokenizer.json suffices

        write_folder_atomic(hf_out, save)
    return model, tokenizer


def run_import(source: str, output_dir: Path, cache_dir: Optional[str] = None, overwrite: bool = False,
               dtype: Optional[str] = None, progress: bool = True) -> dict:
    """Import ``source`` (HF folder, ``.gguf`` file or ``embedded:<name>``) into ``output_dir``."""
    from nemo_upcycle.checkpoint.convert.dtypes import parse_dtype
    from nemo_upcycle.checkpoint.sources.embedded import EMBEDDED_PREFIX, embedded_paths, is_embedded

    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    torch_dtype = parse_dtype(dtype, ImportError_)
    if is_embedded(source):
        from nemo_upcycle.data.assets import smollm2_gguf

        hf_dir = embedded_paths(cache_dir, source[len(EMBEDDED_PREFIX):])["hf"]
        if not hf_dir.is_dir():
            hf_dir.parent.mkdir(parents=True, exist_ok=True)
            load_gguf_as_hf(smollm2_gguf(), hf_dir)
        return import_hf_folder(hf_dir, output_dir, overwrite, torch_dtype, progress)
    path = Path(source)
    if source.endswith(".gguf"):
        return import_gguf(path, output_dir, overwrite, torch_dtype or torch.float32, progress)
    if not path.exists():
        raise ImportError_(f"source {path} does not exist")
    if not path.is_dir():
        raise ImportError_(f"source {path} is neither a Hugging Face folder nor a .gguf file")
    return import_hf_folder(path, output_dir, overwrite, torch_dtype, progress)


def summary_line(summary: dict, output_dir) -> str:
    return (
        f"imported {summary['tensors']} tensors ({summary['chunks']} chunks), "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f}s -> {output_dir}"
    )
