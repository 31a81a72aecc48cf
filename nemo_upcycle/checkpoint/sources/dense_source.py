"""The one answer to "what is this dense checkpoint?", for every entry point.

:func:`open_dense_source` resolves ``model.dense_checkpoint`` (an HF folder, a torch_dist
checkpoint, a NeMo 2 checkpoint or its ``weights/``, a Megatron-LM root or ``iter_*``
folder, a GGUF file, an embedded model), reads the architecture the checkpoint states,
fills ``model=auto`` from it, compares every stated value with the configuration, and
returns a :class:`~nemo_upcycle.checkpoint.sources.slices.DenseSource` that reads slices. It reads
metadata only (config files, headers, shapes): every refusal comes before any weight.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from nemo_upcycle.checkpoint.architecture import ARCH_KEYS, Architecture, fill_and_compare
from nemo_upcycle.checkpoint.sources.embedded import EMBEDDED_PREFIX, ensure_embedded, is_embedded
from nemo_upcycle.model.megatron_keys import EMBEDDING, FC1, FC2, OUTPUT, PROJ, Q_NORM, QKV, QKV_BIAS
from nemo_upcycle.errors import DenseCheckpointMismatch, UpcycleError
from nemo_upcycle.upcycle.dense_keys import DenseKeyResolver

MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json and safetensors weights."""
    from nemo_upcycle.checkpoint.sources.hf_safetensors import INDEX_FILE

    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / INDEX_FILE).is_file()
    )


def megatron_lm_iteration(root: Path) -> Path:
    """The iteration folder a Megatron-LM checkpoint root's tracker file names.

    Megatron-LM writes the tracker only after an iteration is completely saved, so the
    iteration it names is the latest complete one.
    """
    text = (root / MEGATRON_LM_TRACKER).read_text().strip()
    name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
    if name is None or not (root / name).is_dir():
        found = sorted(p.name for p in root.glob("iter_*"))
        raise UpcycleError(
            f"{root / MEGATRON_LM_TRACKER} names iteration {text!r}, but {root / (name or text)} does not "
            f"exist (iterations present: {', '.join(found) or 'none'}); point model.dense_checkpoint at "
            "one of them, or fix the tracker file"
        )
    return root / name


def checkpoint_path(cfg: Any) -> Path:
    """Where the dense weights are: an embedded model is imported first (rank 0, once)."""
    ckpt = str(cfg.model.dense_checkpoint)
    if is_embedded(ckpt):
        return ensure_embedded(ckpt, cfg.cache_dir)["torch_dist"]
    path = Path(ckpt)
    if path.is_dir() and (path / MEGATRON_LM_TRACKER).is_file():
        return megatron_lm_iteration(path)
    return path


def _open(path: Path):
    """(source, what its metadata states, where that was read) for an existing path."""
    from nemo_upcycle.checkpoint.sources.gguf_file import GGUFSource
    from nemo_upcycle.checkpoint.sources.hf_safetensors import SafetensorsSource
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    if path.is_file() and path.suffix == ".gguf":
        source = GGUFSource(path)
        return source, source.architecture(), str(path)
    if is_hf_folder(path):
        source = SafetensorsSource(path)
        return source, source.folder.stated, str(path / "config.json")
    source = TorchDistCheckpoint(path)
    stated, where = torch_dist_metadata(path, source.path)
    return source, stated, where


def torch_dist_metadata(given: Path, weights: Path) -> tuple[dict, str]:
    """What a torch_dist checkpoint's own metadata states: this project's import record, a
    NeMo 2 context, or a Megatron-LM iteration's saved arguments (else nothing)."""
    from nemo_upcycle.checkpoint.sources.torch_dist import MODEL_INFO

    info = weights / MODEL_INFO
    if info.is_file():
        data = json.loads(info.read_text())
        return {k: data[k] for k in ARCH_KEYS if k in data}, str(info)
    for root in (given, weights.parent):
        if (root / "context").is_dir():
            from nemo_upcycle.checkpoint.sources.nemo2_context import stated_architecture

            return stated_architecture(root), str(root / "context")
    if (weights / "common.pt").is_file():
        from nemo_upcycle.checkpoint.sources.megatron_lm_args import stated_by_megatron_lm_args

        return stated_by_megatron_lm_args(weights / "common.pt"), str(weights / "common.pt")
    return {}, str(weights)


def stated_by_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """What megatron-core tensor shapes alone say (the heads need the metadata or the user)."""
    resolver = DenseKeyResolver(shapes, num_layers=None)
    out = {}
    try:
        out["vocab_size"], out["hidden_size"] = resolver.dense_shape(None, EMBEDDING)
        out["num_layers"] = resolver.layer_count(QKV)
        out["ffn_hidden_size"] = resolver.dense_shape(0, FC1)[0] // 2
    except DenseCheckpointMismatch as err:
        raise DenseCheckpointMismatch(f"not a dense Llama-family checkpoint: {err}") from None
    out["tie_embeddings"] = not resolver.has(None, OUTPUT)
    out["qkv_bias"] = resolver.has(0, QKV_BIAS)
    out["qk_layernorm"] = resolver.has(0, Q_NORM)
    if out["qk_layernorm"]:
        out["head_dim"] = resolver.dense_shape(0, Q_NORM)[0]
    return out


def stated_architecture(source, metadata: dict, where: str) -> dict:
    """The metadata's values and the shapes', which must agree where both speak."""
    shapes = stated_by_shapes(source.tensor_shapes())
    clashes = [f"{k}: metadata {metadata[k]}, tensor shapes {shapes[k]}"
               for k in shapes if k in metadata and metadata[k] != shapes[k]]
    if clashes:
        raise DenseCheckpointMismatch(
            f"the checkpoint {source.path} contradicts itself ({where} against its tensors): "
            + "; ".join(clashes) + "; re-import or re-copy it"
        )
    return {**shapes, **metadata}


def _default_name(cfg: Any) -> str:
    ckpt = str(cfg.model.dense_checkpoint)
    if is_embedded(ckpt):
        return ckpt[len(EMBEDDED_PREFIX):]
    path = Path(ckpt)
    name = path.name if path.name not in ("weights", "") else path.parent.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "dense"


def open_dense_source(cfg: Any):
    """The dense source of ``cfg``; fills ``model=auto`` and checks every stated value first."""
    model = cfg.model
    if OmegaConf.is_missing(model, "dense_checkpoint"):
        raise UpcycleError(
            f"model.dense_checkpoint is not set (model={model.name if not OmegaConf.is_missing(model, 'name') else 'auto'}): "
            "point it at a Hugging Face folder, a torch_dist / NeMo 2 / Megatron-LM checkpoint or a .gguf file"
        )
    path = checkpoint_path(cfg)
    if not path.exists():
        raise UpcycleError(
            f"model.dense_checkpoint={path} does not exist; point it at a Hugging Face folder, a "
            "megatron-core/NeMo 2/Megatron-LM checkpoint or a .gguf file (python -m "
            "nemo_upcycle.import_dense converts the others), or use embedded:smollm2_135m"
        )
    source, metadata, where = _open(path)
    stated = stated_architecture(source, metadata, where)
    if OmegaConf.is_missing(model, "name"):
        with open_dict(model):
            model.name = _default_name(cfg)
    problems = fill_and_compare(model, stated, where)
    if not problems:
        problems = shape_problems(model, source.tensor_shapes())
    if problems:
        raise DenseCheckpointMismatch(
            f"the dense checkpoint {cfg.model.dense_checkpoint} does not match the model config:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return source


def shape_problems(m: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every tensor shape the (filled) config implies that the checkpoint does not have."""
    arch = Architecture.of(m)
    resolver = DenseKeyResolver(shapes, arch.num_layers)
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    expected = {
        (None, EMBEDDING): ((arch.vocab_size, arch.hidden_size), "vocab_size, hidden_size"),
        (0, QKV): (
            (qkv_rows, arch.hidden_size), "(num_attention_heads + 2*num_query_groups) * head_dim, hidden_size"),
        (0, PROJ): ((arch.hidden_size, arch.num_attention_heads * arch.head_dim),
                    "hidden_size, num_attention_heads * head_dim"),
        (0, FC1): ((2 * arch.ffn_hidden_size, arch.hidden_size), "2*ffn_hidden_size, hidden_size"),
        (0, FC2): ((arch.hidden_size, arch.ffn_hidden_size), "hidden_size, ffn_hidden_size"),
        (arch.num_layers - 1, FC1): ((2 * arch.ffn_hidden_size, arch.hidden_size), "the last layer's FFN"),
    }
    if arch.qkv_bias:
        expected[(0, QKV_BIAS)] = ((qkv_rows,), "q/k/v biases")
    if arch.qk_layernorm:
        expected[(0, Q_NORM)] = ((arch.head_dim,), "head_dim")
    if not arch.tie_embeddings:
        expected[(None, OUTPUT)] = ((arch.vocab_size, arch.hidden_size), "an untied output layer")
    problems = []
    for (layer, name), (shape, meaning) in expected.items():
        try:
            have = resolver.dense_shape(layer, name)
        except DenseCheckpointMismatch as err:
            problems.append(str(err))
            continue
        if tuple(have) != tuple(shape):
            problems.append(f"{name}: the checkpoint has shape {list(have)}, the config implies {list(shape)} ({meaning})")
    return problems


def resolve_dense_model(cfg) -> None:
    """Fill ``model=auto`` from the dense checkpoint and check it, when one is named.

    Entry points that never read a dense model (the planner with a preset) skip it.
    """
    if not OmegaConf.is_missing(cfg.model, "dense_checkpoint") or OmegaConf.is_missing(cfg.model, "name"):
        open_dense_source(cfg)
