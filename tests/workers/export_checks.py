"""Rank functions of the export-target tests: several MoE configurations per launch.

``save_cases`` upcycles each case from its dense checkpoint (torch_dist or a Hugging Face
folder written by transformers) at this layout, moves experts (expert noise) and routers off
their step-0 values, and saves the MoE as a torch_dist checkpoint. ``compare_cases`` loads
each saved MoE with megatron-core's own loader at this layout and compares its logits, and
optionally its greedy generation, with transformers' on the exported folder.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from tests.workers.checkpoint_checks import _full_vocab_logits
from tests.workers.parallel_checks import _load, _state
from tests.workers.upcycle_checks import _setup, _tokens


def _move_routers(chunks, std: float = 0.05) -> None:
    """Routers (and aux_free's expert bias, zero at step 0) differ from their initial values,
    as after training, identically on every rank."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for chunk in chunks:
            tensors = dict(chunk.named_parameters(), **dict(chunk.named_buffers()))
            for name in sorted(tensors):
                if ".router." in name and name.endswith(("weight", "expert_bias")):
                    tensors[name].add_(std * torch.randn(tensors[name].shape, generator=gen))


def save_cases(cases: dict) -> dict:
    """cases: name -> {"overrides": [...], "path": where to save}."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.checkpoint.dense_source import open_dense_source
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.upcycle.engine import upcycle_from_dense

    torch.set_num_threads(1)
    for case in cases.values():
        cfg = _setup(case["overrides"] + ["moe.expert_noise_std=0.05"])
        chunks = build_model_chunks(cfg)
        upcycle_from_dense(chunks, cfg, open_dense_source(cfg))
        _move_routers(chunks)
        os.makedirs(case["path"], exist_ok=True)
        dist_checkpointing.save(_state(chunks), case["path"])
        dist.barrier()
    return {"rank": dist.get_rank()}


def _greedy(chunks, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with megatron-core, one full forward per token (no cache: tiny models)."""
    from nemo_upcycle.model.forward import run_schedule

    tokens = prompt
    for _ in range(new_tokens):
        logits = _full_vocab_logits(run_schedule(chunks, tokens))
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens


def _hf(folder: str, tokens: torch.Tensor, prompt: Optional[torch.Tensor], new_tokens: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
        generated = None if prompt is None else model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False)
    return logits, generated, type(model).__name__


def compare_cases(cases: dict, seq: int = 32, new_tokens: int = 20) -> dict:
    """cases: name -> {"overrides", "path", "hf_dir", "generate": bool}; results by name on rank 0."""
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks

    torch.set_num_threads(1)
    results = {}
    for name, case in cases.items():
        cfg = _setup(case["overrides"])
        chunks = build_model_chunks(cfg)
        _load(chunks, case["path"])
        for c in chunks:
            c.eval()
        tokens = _tokens(cfg.model.vocab_size, batch=2, seq=seq, seed=3)
        prompt = tokens[:1, : seq // 2] if case.get("generate") else None
        with torch.no_grad():
            logits = _full_vocab_logits(run_schedule(chunks, tokens))
            mg_generated = _greedy(chunks, prompt, new_tokens) if prompt is not None else None
        del chunks
        if dist.get_rank() == 0:
            reference, hf_generated, arch = _hf(case["hf_dir"], tokens, prompt, new_tokens)
            results[name] = {
                "class": arch,
                "max_abs_diff": (logits - reference).abs().max().item(),
                "logit_scale": reference.abs().max().item(),
                "generation_equal": None if prompt is None else torch.equal(mg_generated, hf_generated),
                "generated_tokens": None if prompt is None else int(hf_generated.shape[1] - prompt.shape[1]),
            }
        dist.barrier()
    return results
