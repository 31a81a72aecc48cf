"""Llama 3.x RoPE scaling ("llama3" in Hugging Face configs), computed for megatron-core.

megatron-core 0.15.3 can apply this scaling itself but fixes three of its four parameters
(low/high frequency factors 1 and 4, original context 8192); Llama 3.2 and fine-tunes use
others. So the frequencies are computed here from all four and set on every GPTModel
chunk's rotary embedding after it is built (NeMo's Llama 3.1 config does the same), one
path for the verify/evaluate models and the NeMo trainer's.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from nemo_upcycle.checkpoint.architecture import Architecture


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Scale RoPE inverse frequencies the way Llama 3.1 was trained.

    Components whose wavelength exceeds ``original_max_position / low_freq_factor`` turn
    ``factor`` times slower; those shorter than ``original_max_position / high_freq_factor``
    are kept; in between, the two are blended linearly in ``original_max_position / wavelength``.
    """
    wavelength = 2 * math.pi / inv_freq
    long_limit = original_max_position / low_freq_factor
    short_limit = original_max_position / high_freq_factor
    slowed = inv_freq / factor
    blend = (original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * slowed + blend * inv_freq
    out = torch.where(wavelength > long_limit, slowed, inv_freq)
    between = (wavelength >= short_limit) & (wavelength <= long_limit)
    return torch.where(between, blended, out)


def apply_rope_scaling(chunk, model: Any) -> None:
    """Set the scaled frequencies on ``chunk`` (a GPTModel) when ``model`` (an Architecture, or the
    ``model.*`` node it is read from) asks for scaling."""
    scaling = Architecture.of(model).rope_scaling
    if scaling is None or getattr(chunk, "rotary_pos_emb", None) is None:
        return
    rope = chunk.rotary_pos_emb
    rope.inv_freq = llama3_inv_freq(rope.inv_freq, scaling.factor, scaling.low_freq_factor,
                                    scaling.high_freq_factor, scaling.original_max_position)
    # forward() memoises its result per sequence length: drop anything computed before.
    rope.forward.cache_clear()
