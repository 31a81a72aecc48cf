"""Resolve ``model.dense_checkpoint`` to a readable dense source, and check it fits the config.

The check uses only the checkpoint's metadata (names and shapes), so a wrong checkpoint
is reported before any weight is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.checkpoint.embedded import ensure_embedded, is_embedded
from nemo_upcycle.upcycle.errors import DenseCheckpointMismatch, UpcycleError
from nemo_upcycle.upcycle.plan import DenseKeyResolver
from nemo_upcycle.upcycle.sources import CheckpointFormatError, DenseSource, TorchDistCheckpoint


def resolve_paths(cfg: Any) -> tuple[Path, Optional[Path]]:
    """(dense checkpoint folder, tokenizer folder or None)."""
    ckpt = str(cfg.model.dense_checkpoint)
    if is_embedded(ckpt):
        paths = ensure_embedded(ckpt, cfg.cache_dir)
        tokenizer = Path(cfg.model.tokenizer) if cfg.model.tokenizer else paths["hf"]
        return paths["torch_dist"], tokenizer
    path = Path(ckpt)
    if cfg.model.tokenizer:
        return path, Path(cfg.model.tokenizer)
    # A Hugging Face folder usually carries its tokenizer.
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return path, path if has_tokenizer else None


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    )


def open_dense_source(cfg: Any) -> DenseSource:
    """A torch_dist / NeMo 2 checkpoint, or a Hugging Face safetensors folder read in place."""
    from nemo_upcycle.checkpoint.safetensors_source import HFFormatError, SafetensorsSource

    path, _ = resolve_paths(cfg)
    if not path.exists():
        raise UpcycleError(
            f"model.dense_checkpoint={path} does not exist; point it at a megatron-core/NeMo 2 "
            "distributed checkpoint or a Hugging Face safetensors folder (or import a GGUF "
            "model with `python -m nemo_upcycle.import_dense`), or use embedded:smollm2_135m"
        )
    try:
        if is_hf_folder(path):
            source = SafetensorsSource(path)
        else:
            source = TorchDistCheckpoint(path)
    except (CheckpointFormatError, HFFormatError) as err:
        raise UpcycleError(str(err)) from None
    check_architecture(cfg, source.tensor_shapes())
    return source


def check_architecture(cfg: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every mismatch between the dense checkpoint's shapes and ``cfg.model``, at once."""
    m = cfg.model
    resolver = DenseKeyResolver(shapes, m.num_layers)
    problems = []
    head_dim = m.hidden_size // m.num_attention_heads
    expected = {
        (None, "embedding.word_embeddings.weight"): ((m.vocab_size, m.hidden_size), "vocab_size, hidden_size"),
        (0, "self_attention.linear_qkv.weight"): (
            ((m.num_attention_heads + 2 * m.num_query_groups) * head_dim, m.hidden_size),
            "(num_attention_heads + 2*num_query_groups) * head_dim, hidden_size",
        ),
        (0, "mlp.linear_fc1.weight"): ((2 * m.ffn_hidden_size, m.hidden_size), "2*ffn_hidden_size, hidden_size"),
        (0, "mlp.linear_fc2.weight"): ((m.hidden_size, m.ffn_hidden_size), "hidden_size, ffn_hidden_size"),
    }
    for (layer, name), (shape, meaning) in expected.items():
        try:
            have = resolver.dense_shape(layer, name)
        except DenseCheckpointMismatch as err:
            problems.append(str(err))
            continue
        if tuple(have) != tuple(shape):
            problems.append(
                f"{name}: the checkpoint has shape {list(have)}, the config implies "
                f"{list(shape)} ({meaning}) from model.{m.name if 'name' in m else ''} settings"
            )
    try:
        resolver.resolve(m.num_layers - 1, "mlp.linear_fc1.weight")
    except DenseCheckpointMismatch as err:
        problems.append(str(err))
    if not m.tie_embeddings:
        try:
            resolver.resolve(None, "output_layer.weight")
        except DenseCheckpointMismatch:
            problems.append(
                "the checkpoint has no output_layer.weight: its embeddings are tied; set model.tie_embeddings=true"
            )
    if problems:
        raise DenseCheckpointMismatch(
            f"the dense checkpoint {cfg.model.dense_checkpoint} does not match the model config:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
