"""Rank functions checking the upcycling maths: granularity, scaling, routers, symmetry breaking."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from tests.workers.upcycle_checks import _setup


def _upcycled(overrides: list[str], path: str):
    from omegaconf import OmegaConf

    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    cfg = _setup(overrides)
    moe = build_model_chunks(cfg)
    upcycle_from_dense(moe, cfg, TorchDistCheckpoint(path))
    dense_cfg = OmegaConf.merge(cfg, {"moe": {"num_experts": 0, "topk": 0, "layers": []}})
    dense = build_model_chunks(dense_cfg)
    upcycle_from_dense(dense, dense_cfg, TorchDistCheckpoint(path))
    return cfg, moe, dense


def moe_layer_vs_dense_ffn(overrides: list[str], path: str, input_scale: float = 1.0) -> dict:
    """Layer 0 on random hidden states: MoE layer output vs the dense FFN's output."""
    cfg, moe, dense = _upcycled(overrides, path)
    moe_mlp, dense_mlp = moe[0].decoder.layers[0].mlp, dense[0].decoder.layers[0].mlp
    x = torch.randn(16, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(3)) * input_scale
    with torch.no_grad():
        y_moe, _ = moe_mlp(x)
        y_dense, _ = dense_mlp(x)
    expert_fc1 = moe_mlp.experts.local_experts[0].linear_fc1.weight
    expert_fc2 = moe_mlp.experts.local_experts[0].linear_fc2.weight
    width = expert_fc2.shape[1]
    dense_fc1 = dense_mlp.linear_fc1.weight
    f = cfg.model.ffn_hidden_size
    # Expert 0 holds slice 0: gate rows [0, width) and up rows [F, F + width) of the dense fc1.
    dense_slice_fc1 = torch.cat([dense_fc1[:width], dense_fc1[f:f + width]])
    # Where a ratio below is NaN, these say which side held the NaN (or a 0/0) and how often.
    nonfinite = {name: int((~torch.isfinite(t)).sum()) for name, t in
                 (("expert_fc1", expert_fc1), ("dense_fc1", dense_slice_fc1), ("y_moe", y_moe), ("y_dense", y_dense))}
    return {
        "nonfinite": nonfinite,
        "zeros_in_dense_fc1": int((dense_slice_fc1 == 0).sum()),
        "rel_diff": float((y_moe - y_dense).norm() / y_dense.norm()),
        "max_abs_diff": float((y_moe - y_dense).abs().max()),
        "fc1_ratio": float((expert_fc1 / dense_slice_fc1).median()),
        "fc2_ratio": float((expert_fc2 / dense_mlp.linear_fc2.weight[:, :width]).median()),
    }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprints(overrides: list[str], path: str) -> dict:
    """Digests of routers (per layer) and of each local expert's weights."""
    cfg, moe, dense = _upcycled(overrides, path)
    routers, experts = {}, {}
    for chunk in moe:
        for layer in chunk.decoder.layers:
            idx = layer.layer_number - 1
            mlp = layer.mlp
            if hasattr(mlp, "router"):
                routers[str(idx)] = _digest(mlp.router.weight)
                for local, e in enumerate(mlp.local_expert_indices):
                    w = mlp.experts.local_experts[local]
                    experts[f"{idx}/{e}"] = _digest(torch.cat([w.linear_fc1.weight.flatten(), w.linear_fc2.weight.flatten()]))
    return {"rank": dist.get_rank(), "routers": routers, "experts": experts}


def reinitialised_channels(overrides: list[str], path: str) -> dict:
    """Per local expert of layer 0: which intermediate channels differ from the dense FFN."""
    from megatron.core import parallel_state

    cfg, moe, dense = _upcycled(overrides, path)
    mlp, dense_mlp = moe[0].decoder.layers[0].mlp, dense[0].decoder.layers[0].mlp
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    out = {}
    for local, e in enumerate(mlp.local_expert_indices):
        fc2 = mlp.experts.local_experts[local].linear_fc2.weight
        width = fc2.shape[1]
        offset = etp_rank * width
        # Under expert-TP the dense model (TP = ETP here) holds the same column slice.
        changed = (fc2 != dense_mlp.linear_fc2.weight).any(dim=0).nonzero().flatten() + offset
        out[str(e)] = changed.tolist()
    return {"rank": dist.get_rank(), "etp_rank": etp_rank, "channels": out}
