"""What a dense checkpoint states about its architecture, in the project's ``model.*`` names.

Every reader (a Hugging Face ``config.json``, this project's import metadata, a NeMo 2
context, a Megatron-LM ``args``, tensor shapes) returns a plain dict ``{model key: value}``
holding only what it really states. :func:`fill_and_compare` then fills ``model=auto``
from it and reports every disagreement with the configuration at once. After that,
everything that derives from the architecture (megatron-core's TransformerConfig, the Hugging
Face shapes and config.json, the planner, :class:`~nemo_upcycle.upcycle.spec.UpcycleSpec`)
reads it through one frozen :class:`Architecture`, never ``cfg.model.*`` key by key.

The families below are those megatron-core's GPTModel represents exactly with this
project's settings (RMSNorm, SwiGLU, RoPE); each row says what its Hugging Face config
maps onto. Anything else is refused here, naming the field and its value, before any
weight is read.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from nemo_upcycle.errors import UserError

# model.* keys a checkpoint can state. Order is the order of messages.
ARCH_KEYS = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings", "rotary_base",
    "norm_eps", "tie_embeddings", "qkv_bias", "qk_layernorm", "rope_scaling_factor",
    "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
    "rope_scaling_original_max_position",
)
# The fields megatron-core's own RoPE scaling fixes (it exposes only the factor); other
# values are honoured by nemo_upcycle.model.rope_scaling, which computes the frequencies itself.
LLAMA3_ROPE_DEFAULTS = {"rope_scaling_low_freq_factor": 1.0, "rope_scaling_high_freq_factor": 4.0,
                        "rope_scaling_original_max_position": 8192}


@dataclass(frozen=True)
class Family:
    """A dense Hugging Face ``model_type``: RMSNorm, SwiGLU, RoPE and no bias but these."""

    qkv_bias: bool  # biases on q/k/v (Qwen2)
    qk_layernorm: bool  # per-head RMSNorm of queries and keys (Qwen3)
    # Qwen configs state a sliding_window they do not use: only use_sliding_window (or
    # sliding layers in layer_types) switches it on.
    sliding_window_switch: bool = False

    def megatron_flags(self) -> dict:
        return dict(qkv_bias=self.qkv_bias, qk_layernorm=self.qk_layernorm)


# Where each family is exported to: checkpoint/hf/export_targets.py.
FAMILIES = {
    "llama": Family(False, False),  # Llama 2/3/3.1-3.3, SmolLM2, TinyLlama
    "mistral": Family(False, False),  # Mistral without a sliding window
    "qwen2": Family(True, False, sliding_window_switch=True),  # Qwen2, Qwen2.5
    "qwen3": Family(False, True, sliding_window_switch=True),  # Qwen3 dense
}


class ArchitectureError(UserError):
    """A checkpoint whose architecture megatron-core cannot compute exactly here."""


def _refuse(problems: list[str], where: str) -> None:
    if problems:
        raise ArchitectureError(
            f"{where} describes a model nemo-upcycle cannot reproduce exactly:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\nSupported: model_type {', '.join(FAMILIES)} with RMSNorm, SwiGLU, full RoPE "
            "(optionally Llama 3.x rope_scaling), no sliding window (see README, supported models)."
        )


def _rope_scaling(config: dict, problems: list[str]) -> dict:
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_scaling_factor": None, **LLAMA3_ROPE_DEFAULTS}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return {"rope_scaling_factor": None, **LLAMA3_ROPE_DEFAULTS}
    if kind != "llama3":
        problems.append(
            f"rope_scaling.rope_type={kind!r}: only 'llama3' RoPE scaling (Llama 3.1-3.3) is "
            "computed exactly here (yarn, dynamic, linear, longrope are not)"
        )
        return {}
    return {
        "rope_scaling_factor": float(scaling["factor"]),
        "rope_scaling_low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
        "rope_scaling_high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
        "rope_scaling_original_max_position": int(scaling.get("original_max_position_embeddings", 8192)),
    }


def _sliding_window(config: dict, model_type: str, problems: list[str]) -> None:
    """A window no sequence can exceed is full attention, which megatron-core computes exactly."""
    window = config.get("sliding_window")
    if FAMILIES[model_type].sliding_window_switch:
        uses = config.get("use_sliding_window", False) or "sliding_attention" in (config.get("layer_types") or [])
        if uses:
            problems.append(f"use_sliding_window=true (sliding_window={window}): megatron-core's "
                            "attention here has no sliding window")
        return
    if window is not None and window < config.get("max_position_embeddings", 0):
        problems.append(
            f"sliding_window={window} is shorter than max_position_embeddings="
            f"{config.get('max_position_embeddings')}: megatron-core's attention here has no sliding "
            "window (a window >= max_position_embeddings, or null, is full attention and is accepted)"
        )


def stated_by_hf_config(config: dict, where: str = "config.json") -> dict:
    """The architecture a dense Hugging Face ``config.json`` states (refusing what cannot run)."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ArchitectureError(
            f"{where}: model_type={model_type!r} is not supported; nemo-upcycle reads "
            f"{', '.join(FAMILIES)} (Llama 2/3.x, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3) "
            "dense models, and the MoE folders its own export writes (README, Export)"
        )
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r}: only SwiGLU (silu) FFNs are supported")
    if config.get("attention_bias"):
        problems.append(
            f"attention_bias=true: {model_type} then also has a bias on o_proj, which megatron-core "
            "can only add together with biases on every linear layer"
        )
    if config.get("mlp_bias"):
        problems.append("mlp_bias=true: FFN biases are not supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={config['partial_rotary_factor']}: only full RoPE is supported")
    _sliding_window(config, model_type, problems)
    rope = _rope_scaling(config, problems)
    _refuse(problems, where)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return dict(
        family=model_type,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        rotary_base=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **FAMILIES[model_type].megatron_flags(),
        **rope,
    )


def _stated(model: Any, key: str, default: Any = None) -> Any:
    """``model.<key>``, or ``default`` where the node has no such key (a ``???`` still raises)."""
    if isinstance(model, Mapping):  # a dict, or an OmegaConf node (whose [key] raises on ???)
        return model[key] if key in model.keys() else default
    return getattr(model, key, default)  # the schema's dataclass (OmegaConf.to_object)


def _required(model: Any, key: str) -> Any:
    return model[key] if isinstance(model, Mapping) else getattr(model, key)


def effective_head_dim(model: Any) -> int:
    """``model.head_dim``, or hidden_size / num_attention_heads when it is null.

    The one home of that rule. Read from a node still being filled (:func:`fill_and_compare`);
    everything after reads :attr:`Architecture.head_dim`.
    """
    head_dim = _stated(model, "head_dim")
    if head_dim:
        return int(head_dim)
    return int(_required(model, "hidden_size")) // int(_required(model, "num_attention_heads"))


def _optional(convert, value: Any) -> Any:
    return None if value is None else convert(value)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x RoPE scaling (Hugging Face ``rope_type: llama3``): the ``model.rope_scaling_*`` keys."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int

    @classmethod
    def of(cls, model: Any) -> Optional["RopeScaling"]:
        """None when ``model.rope_scaling_factor`` is null (or absent: a config saved before it existed)."""
        factor = _stated(model, "rope_scaling_factor")
        if factor is None:
            return None
        return cls(factor=float(factor), low_freq_factor=float(_required(model, "rope_scaling_low_freq_factor")),
                   high_freq_factor=float(_required(model, "rope_scaling_high_freq_factor")),
                   original_max_position=int(_required(model, "rope_scaling_original_max_position")))

    def hf_config(self) -> dict:
        """As Hugging Face's ``config.json`` writes it."""
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position,
        }


@dataclass(frozen=True)
class Architecture:
    """The dense model's architecture (the ``model.*`` keys of :data:`ARCH_KEYS`), read once.

    Everything derived from the architecture reads this record, so each key is read, and
    ``head_dim`` resolved, in one place. It is the architecture of the dense model; what
    upcycling makes of its FFNs is :class:`~nemo_upcycle.upcycle.spec.UpcycleSpec`.
    """

    # The layer stack: all the upcycling arithmetic needs, so every node states it.
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    # None only where a node does not state the key: a hand-made configuration for the
    # upcycling arithmetic alone may state just the layer stack. A composed configuration
    # states all of them (config/schema.py), model=auto filled before anything reads them.
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None  # resolved: model.head_dim, or hidden_size // num_attention_heads
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rotary_base: Optional[float] = None
    norm_eps: Optional[float] = None
    tie_embeddings: Optional[bool] = None
    # What a configuration saved before these keys existed meant.
    family: str = "llama"
    qkv_bias: bool = False
    qk_layernorm: bool = False
    rope_scaling: Optional[RopeScaling] = None

    @classmethod
    def of(cls, model: Any) -> "Architecture":
        """The architecture a ``model.*`` node (OmegaConf, the schema's dataclass, or a dict of
        its keys, as the readers above return) states; an Architecture is returned as it is."""
        if isinstance(model, Architecture):
            return model
        heads = _optional(int, _stated(model, "num_attention_heads"))
        return cls(
            num_layers=int(_required(model, "num_layers")),
            hidden_size=int(_required(model, "hidden_size")),
            ffn_hidden_size=int(_required(model, "ffn_hidden_size")),
            num_attention_heads=heads,
            num_query_groups=_optional(int, _stated(model, "num_query_groups")),
            head_dim=None if heads is None and not _stated(model, "head_dim") else effective_head_dim(model),
            vocab_size=_optional(int, _stated(model, "vocab_size")),
            max_position_embeddings=_optional(int, _stated(model, "max_position_embeddings")),
            rotary_base=_optional(float, _stated(model, "rotary_base")),
            norm_eps=_optional(float, _stated(model, "norm_eps")),
            tie_embeddings=_optional(bool, _stated(model, "tie_embeddings")),
            family=str(_stated(model, "family", "llama")),
            qkv_bias=bool(_stated(model, "qkv_bias", False)),
            qk_layernorm=bool(_stated(model, "qk_layernorm", False)),
            rope_scaling=RopeScaling.of(model),
        )


def _same(a: Any, b: Any) -> bool:
    # Checkpoints converted through float32 (GGUF) state 1e-5 as 9.99999974e-06.
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    return a == b


def _configured(model: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(model, key):
        return "???"
    if key == "head_dim":
        return effective_head_dim(model)
    return model[key]


def fill_and_compare(model: Any, stated: dict, where: str) -> list[str]:
    """Fill the missing (``???``) ``model.*`` keys from ``stated``; every disagreement, as sentences.

    ``model`` is the config's OmegaConf ``model`` node; it is changed in place. With
    ``model=auto`` every key starts missing, so the result is the checkpoint's own
    architecture; a value given on the command line must agree with the checkpoint where
    the checkpoint states it, and supplies it where the checkpoint does not.
    """
    from omegaconf import OmegaConf, open_dict

    disagreements = []
    with open_dict(model):
        for key in ARCH_KEYS:
            if key not in stated:
                continue
            have = _configured(model, key)
            if have == "???":
                model[key] = stated[key]
            elif not _same(have, stated[key]):
                disagreements.append(f"model.{key}={have} but the checkpoint has {stated[key]}")
    if disagreements:
        disagreements.append(f"{where} states: {describe(stated)}; use model=auto to take every value from it")
    missing = [k for k in ARCH_KEYS if k in model.keys() and OmegaConf.is_missing(model, k)]
    if missing:
        disagreements.append(
            f"the checkpoint does not state {', '.join('model.' + k for k in missing)}: set "
            + " ".join(f"model.{k}=..." for k in missing) + " on the command line"
        )
    return disagreements


def describe(stated: dict) -> str:
    return ", ".join(f"{k}={stated[k]}" for k in ARCH_KEYS if k in stated)
