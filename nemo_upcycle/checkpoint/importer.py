"""Import a dense Llama-architecture model (HF folder or GGUF) into a torch_dist checkpoint.

The result is a megatron-core distributed checkpoint, the format online upcycling reads
and NeMo 2 / Megatron use. It is written under a temporary name and renamed when
complete, so an interrupted import never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from nemo_upcycle.checkpoint.hf_llama import megatron_param_tensors

SUPPORTED_MODEL_TYPES = ("llama",)
MODEL_INFO = "nemo_upcycle_model.json"


class ImportError_(ValueError):
    """A source that cannot be imported; the message names the problem and the fix."""


@dataclass
class DenseArchitecture:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_eps: float
    tie_embeddings: bool

    @classmethod
    def from_hf_config(cls, config) -> "DenseArchitecture":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ImportError_(
                f"model_type {model_type!r} is not a Llama-architecture model; nemo-upcycle "
                f"imports {SUPPORTED_MODEL_TYPES} (Llama 2/3, SmolLM2, TinyLlama, ...)"
            )
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ImportError_("attention or MLP biases are not supported (Llama has none)")
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            rotary_base=float(getattr(config, "rope_theta", 10000.0)),
            norm_eps=float(config.rms_norm_eps),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def as_model_overrides(self) -> list[str]:
        return [f"model.{k}={v}" for k, v in self.__dict__.items()]


def load_gguf_as_hf(gguf_file: Path, hf_out: Optional[Path] = None):
    """Dequantise a GGUF file with transformers; optionally keep a safetensors copy."""
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
        tmp = hf_out.with_name(hf_out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(hf_out)
    return model, tokenizer


def write_torch_dist(
    get: Callable[[str], torch.Tensor],
    arch: DenseArchitecture,
    output_dir: Path,
    progress: bool = True,
) -> dict:
    """Build the dense megatron-core model on one gloo rank, fill it from ``get``, save it."""
    from megatron.core import dist_checkpointing
    from tqdm import tqdm

    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.modeling import build_model_chunks
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.testing.multirank import free_port

    started = time.perf_counter()
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    cfg = compose_config(["moe=dense", "model=tiny_llama", "model.dense_checkpoint=none", *arch.as_model_overrides()])
    setup_parallel(cfg.parallel, cfg.seed)
    (model,) = build_model_chunks(cfg, None)
    params = dict(model.named_parameters())
    total_bytes = 0
    expected = 2 + 6 * arch.num_layers + (0 if arch.tie_embeddings else 1)
    with torch.no_grad():
        items = megatron_param_tensors(get, arch.num_layers, arch.num_attention_heads,
                                       arch.num_query_groups, arch.tie_embeddings)
        for name, tensor in tqdm(items, total=expected, desc="import", unit="tensor", disable=not progress):
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ImportError_(f"{name}: source shape {list(tensor.shape)} != expected {list(target.shape)}")
            target.copy_(tensor)
            total_bytes += tensor.numel() * tensor.element_size()
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    (tmp / MODEL_INFO).write_text(json.dumps(arch.__dict__, indent=2))
    tmp.rename(output_dir)
    return {"tensors": expected, "bytes": total_bytes, "seconds": time.perf_counter() - started}
