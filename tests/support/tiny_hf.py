"""Tiny random dense models of each supported family, written by transformers itself.

The import checks must not share the project's reading of Hugging Face formats, so the
folders come from transformers' own ``save_pretrained``: seeded, with non-zero biases and
norm weights (transformers initialises norms to one and biases to zero, which would hide a
mis-mapped tensor), and every family-specific setting switched on.

``python -m tests.support.tiny_hf <family> <folder> [key=value ...]``
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0)

# Each family as people hold it, shrunk: the settings that make it differ from plain Llama.
FAMILIES = {
    # Llama 3.1: RoPE scaling; the original context is shrunk with the model so that the
    # scaled and smoothed frequency bands both fall inside 1,000-token test sequences.
    "llama31": ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=256))),
    # Llama 3.1's exact RoPE parameters (megatron-core's fixed ones).
    "llama31_8192": ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=8192),
                                   max_position_embeddings=131072)),
    # Llama 3.2 1B/3B: tied embeddings, factor 32, an explicit head_dim.
    "llama32": ("llama", dict(tie_word_embeddings=True, head_dim=32,
                              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=256))),
    "mistral": ("mistral", dict(sliding_window=None, head_dim=24, rope_theta=1000000.0)),
    "qwen2": ("qwen2", dict(use_sliding_window=False, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen3": ("qwen3", dict(head_dim=32, use_sliding_window=False, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give norms and biases values of their own (not 1 and 0), so a mis-mapping shows."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def write_tiny_hf(family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  max_shard_size: str = "5GB", **config) -> Path:
    """Write the tiny ``family`` model to ``folder`` with transformers; ``config`` overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = FAMILIES.get(family, (family, {}))
    cfg = AutoConfig.for_model(model_type, **{**BASE, **settings, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed)
    model.to(dtype).save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_size)
    return Path(folder)


def write_word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """The cheapest tokenizer that loads offline through AutoTokenizer: a word-level
    vocabulary of exactly ``vocab_size`` entries (<unk>, <s>, </s>, w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return Path(folder)


def main(argv: list[str]) -> None:
    family, folder, *pairs = argv
    overrides = {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs)}
    write_tiny_hf(family, Path(folder), **overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
