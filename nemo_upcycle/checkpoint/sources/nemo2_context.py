"""What a NeMo 2 checkpoint's ``context/`` states about its architecture, without NeMo.

A NeMo 2 checkpoint is ``weights/`` (torch_dist) beside ``context/``, where NeMo records
how the model was built: ``model.yaml`` (the LightningModule, its ``config`` a megatron
TransformerConfig subclass with every field written out) and ``io.json`` (a fiddle graph
of the constructor calls). This runs before any heavy import: model.yaml is read as YAML.

The model config's class names the family (NeMo's importers write ``LlamaConfig`` or
``Llama31Config`` for Hugging Face Llama folders, ``MistralConfig7B``, ``Qwen2Config``,
``Qwen3Config``...); this project's own training job writes ``UpcycleGPTConfig``, whose
``job`` field holds the whole job configuration, and its ``job["model"]`` is used instead.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from nemo_upcycle.checkpoint.architecture import LLAMA3_ROPE_DEFAULTS
from nemo_upcycle.errors import UpcycleError

# NeMo config class name (prefix) -> family. Llama4 and Mixtral are MoE: not matched.
_FAMILIES = (
    (re.compile(r"(Code)?Llama(2|3|31|32|33)?Config"), "llama"),
    (re.compile(r"Mistral\w*Config"), "mistral"),
    (re.compile(r"Qwen25?Config"), "qwen2"),
    (re.compile(r"Qwen3Config"), "qwen3"),
)
_OWN_CONFIG = "UpcycleGPTConfig"

# this project's model.* key <- NeMo / megatron-core config field
_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "head_dim": "kv_channels",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "seq_length",
    "rotary_base": "rotary_base",
    "norm_eps": "layernorm_epsilon",
    "tie_embeddings": "share_embeddings_and_output_weights",
    "qkv_bias": "add_qkv_bias",
    "qk_layernorm": "qk_layernorm",
}
# this project's model.* rope keys <- Llama31Config fields (Llama 3.2/3.3 are its subclasses)
_ROPE = {
    "rope_scaling_factor": "scale_factor",
    "rope_scaling_low_freq_factor": "low_freq_factor",
    "rope_scaling_high_freq_factor": "high_freq_factor",
    "rope_scaling_original_max_position": "old_context_len",
}
_JOB_KEYS = ("family", *_FIELDS, *_ROPE)


def stated_architecture(root: Path) -> dict:
    """The architecture ``root/context`` states, as ``{model key: value}`` (only what it states).

    ``{}`` when there is no readable context (the caller falls back to tensor shapes);
    :class:`UpcycleError` when the context names a model this project does not upcycle.
    """
    config = model_config(Path(root) / "context")
    if config is None:
        return {}
    cls = str(config.get("_target_", "")).rsplit(".", 1)[-1]
    if cls == _OWN_CONFIG:
        return _from_job(config.get("job"))
    family = next((name for pattern, name in _FAMILIES if pattern.match(cls)), None)
    if family is None:
        raise UpcycleError(
            f"{root}: its NeMo context describes the model {config.get('_target_')!r}; nemo-upcycle "
            "upcycles dense Llama, Mistral, Qwen2 and Qwen3 checkpoints (NeMo config classes "
            "LlamaConfig, Llama2/3/31/32/33Config*, CodeLlamaConfig*, Mistral*Config*, "
            "Qwen2Config*, Qwen25Config*, Qwen3Config*)"
        )
    if config.get("num_moe_experts"):  # e.g. Qwen3Config30B_A3B: already an MoE
        raise UpcycleError(f"{root}: its NeMo context ({cls}) describes an MoE with "
                           f"{config['num_moe_experts']} experts, not a dense model")
    window = config.get("window_size")  # MistralConfig7B: [4096, 0]
    if window and window[0] not in (None, -1) and window[0] < config.get("seq_length", 0):
        raise UpcycleError(f"{root}: its NeMo context ({cls}) states a sliding attention window "
                           f"of {window[0]} tokens; megatron-core's attention here has none")

    stated: dict[str, Any] = {"family": family}
    for key, field in _FIELDS.items():
        if config.get(field) is not None:
            stated[key] = config[field]
    if "head_dim" not in stated and {"hidden_size", "num_attention_heads"} <= stated.keys():
        stated["head_dim"] = stated["hidden_size"] // stated["num_attention_heads"]  # megatron's default
    # Of these classes only Llama31Config (and Llama 3.2/3.3, its subclasses) scales RoPE.
    if config.get("scale_factor") is not None:
        stated.update({key: config[nemo] for key, nemo in _ROPE.items()})
    else:
        stated.update(rope_scaling_factor=None, **LLAMA3_ROPE_DEFAULTS)
    return stated


def _from_job(job: Any) -> dict:
    """This project's checkpoints: the job's own ``model`` section, in the same keys."""
    model = job.get("model") if isinstance(job, dict) else None
    if not isinstance(model, dict):
        return {}
    stated = {key: model[key] for key in _JOB_KEYS if key in model}
    if stated.get("head_dim") is None and {"hidden_size", "num_attention_heads"} <= stated.keys():
        stated["head_dim"] = stated["hidden_size"] // stated["num_attention_heads"]
    return stated


def model_config(context: Path) -> Optional[dict]:
    """``model.config`` of ``context/model.yaml`` as a dict (``_target_`` = its class), or None.

    Only model.yaml: it lists every field of the config. io.json (a fiddle graph) records
    only the constructor's arguments, so it would silently miss class defaults (e.g. the
    scale_factor of a Llama32Config1B built without arguments); without model.yaml the
    caller reads tensor shapes instead.
    """
    try:
        model = yaml.safe_load((context / "model.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None  # missing or unreadable
    config = model.get("config") if isinstance(model, dict) else None
    return config if isinstance(config, dict) else None


def stored_job(root: Path) -> Optional[dict]:
    """The whole job configuration this project's training job stored in ``root/context``.

    ``UpcycleGPTConfig.job`` is the resolved Hydra configuration of the launch that saved
    the checkpoint (NeMo writes it into model.yaml with the rest of the model config), so it
    travels with the checkpoint. None for checkpoints other tools wrote.
    """
    config = model_config(Path(root) / "context")
    if config is None or str(config.get("_target_", "")).rsplit(".", 1)[-1] != _OWN_CONFIG:
        return None
    job = config.get("job")
    return job if isinstance(job, dict) else None


def stored_layer_naming(root: Path) -> Optional[str]:
    """The layer spec's checkpoint naming the training job recorded in ``root/context``
    (``UpcycleGPTConfig.layer_naming``; nemo_upcycle.model.megatron_keys), or None."""
    config = model_config(Path(root) / "context")
    naming = config.get("layer_naming") if config else None
    return naming if isinstance(naming, str) else None


def context_tokenizer(root: Path) -> Optional[Path]:
    """The tokenizer folder NeMo copied into ``root/context`` (None when there is none).

    NeMo copies the tokenizer's folder into the context and records its new, relative
    name as the tokenizer's ``pretrained_model_name`` in model.yaml.
    """
    from nemo_upcycle.checkpoint.hf.tokenizer_files import has_tokenizer

    context = Path(root) / "context"
    try:
        model = yaml.safe_load((context / "model.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    tokenizer = model.get("tokenizer") if isinstance(model, dict) else None
    name = tokenizer.get("pretrained_model_name") if isinstance(tokenizer, dict) else None
    for folder in ([context / str(name)] if name else []) + [context / "nemo_tokenizer"]:
        if has_tokenizer(folder):
            return folder
    return None
