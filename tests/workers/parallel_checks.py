"""Rank functions proving megatron-core runs on CPU/gloo: forward+backward at many layouts."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tests.workers.upcycle_checks import _setup, _tokens


def _state(chunks):
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load(chunks, path):
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_state(chunks), path)
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"chunk{i}"])


def save_moe_from_dense(overrides: list[str], dense_path: str, moe_path: str) -> dict:
    """Upcycle with expert noise (so experts differ and routing matters) and save the MoE."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    cfg = _setup(overrides + ["moe.expert_noise_std=0.05"])
    chunks = build_model_chunks(cfg)
    upcycle_from_dense(chunks, cfg, TorchDistCheckpoint(dense_path))
    os.makedirs(moe_path, exist_ok=True)
    dist_checkpointing.save(_state(chunks), moe_path)
    return {"ok": True}


def loss_and_grads(overrides: list[str], path: str, save_to: str | None = None, micro_batch_size: int = 2) -> dict:
    """Load ``path`` at this layout, run forward+backward over micro-batches of the batch of 4, report."""
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks

    cfg = _setup(overrides)
    chunks = build_model_chunks(cfg)
    _load(chunks, path)
    tokens = _tokens(cfg.model.vocab_size, batch=4, seq=32, seed=1)
    labels = torch.roll(tokens, -1, dims=1)
    loss = run_schedule(chunks, tokens, labels, micro_batch_size=micro_batch_size, forward_only=False)
    grads = [p.grad if p.grad is not None else getattr(p, "main_grad", None) for c in chunks for p in c.parameters()]
    grads = [g for g in grads if g is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    nonzero = sum(int(g.abs().sum() > 0) for g in grads)
    value = torch.tensor([float(loss) if loss is not None else -1.0], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)  # the last pipeline stage holds the loss
    if save_to:
        from megatron.core import dist_checkpointing

        os.makedirs(save_to, exist_ok=True)
        dist_checkpointing.save(_state(chunks), save_to)
    return {"loss": float(value), "grads": len(grads), "finite": finite, "nonzero_grads": nonzero}
