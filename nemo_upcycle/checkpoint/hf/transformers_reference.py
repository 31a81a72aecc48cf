"""The dense model computed by transformers: the independent side of ``verify``'s import check.

A dense-vs-MoE comparison inside megatron-core cannot see a setting read wrongly from the
checkpoint (both sides share it); transformers reading the same Hugging Face folder can.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def reference_folder(source) -> Optional[Path]:
    """The HF folder the dense source is (or was imported from), if it is still there."""
    from nemo_upcycle.checkpoint.sources.dense_source import is_hf_folder
    from nemo_upcycle.checkpoint.sources.torch_dist import MODEL_INFO

    path = Path(source.path)
    if is_hf_folder(path):
        return path
    info = path / MODEL_INFO
    if info.is_file():
        origin = json.loads(info.read_text()).get("source")
        if origin and is_hf_folder(Path(origin)):
            return Path(origin)
    return None


def vocab_slice_logits(folder: Path, tokens: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """transformers' fp32 logits for ``tokens``, the vocabulary part this TP rank holds, on the
    compute device (where megatron-core's logits are)."""
    from transformers import AutoModelForCausalLM

    from nemo_upcycle.platform.device import compute_device, to_compute

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval().to(compute_device())
    with torch.no_grad():
        logits = model(to_compute(tokens)).logits
    part = logits.shape[-1] // tp_size
    return logits[..., tp_rank * part:(tp_rank + 1) * part]
