"""Functions run on every rank by the multi-rank tests (see tests.support.multirank)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _setup(overrides: list[str]):
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.platform.distributed import setup_parallel

    cfg = compose_config(overrides)
    setup_parallel(cfg.parallel, cfg.seed, timeout_s=120)
    return cfg


def _tokens(vocab: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_dense(overrides: list[str], path: str, init_std: float = 0.08) -> dict:
    """Build a randomly initialised dense model at this layout and save it (torch_dist)."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.model.modeling import build_model_chunks, build_transformer_config

    cfg = _setup(overrides + ["moe=dense"])
    chunks = build_model_chunks(cfg, build_transformer_config(cfg, init_method_std=init_std))
    # Norm weights start at 1; make them non-trivial so a misplaced norm shows in the logits.
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    os.makedirs(path, exist_ok=True)
    state = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)} if len(chunks) > 1 else chunks[0].sharded_state_dict()
    dist_checkpointing.save(state, path)
    dist.barrier()
    return {"rank": dist.get_rank()}


def _max_over_world(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def dense_vs_upcycled(overrides: list[str], path: str, seq: int = 32, namings: tuple = ("local",)) -> dict:
    """Logits of the dense model (megatron's own loader) vs the upcycled MoE, same tokens.

    ``namings``: the layer specs' checkpoint namings (nemo_upcycle.model.megatron_keys) to build
    the MoE with, one after the other; "transformer_engine" is megatron-core's local spec
    without the MoE norm's key mapping (model/modeling.local_spec_with_te_names), so the TE
    spec's names come from megatron-core's own TransformerLayer. The first naming's numbers
    are the result's top level, each naming's under ``by_naming``.
    """
    from megatron.core import dist_checkpointing

    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.megatron_keys import layer_naming_of_keys, sharded_items
    from nemo_upcycle.model.modeling import LAYER_NAMES_ENV, build_model_chunks
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    from nemo_upcycle.config.compose import compose_config

    cfg = _setup(overrides)
    dense_cfg = compose_config(overrides + ["moe=dense", "parallel.ep=1", "parallel.etp=null"])
    tokens = _tokens(cfg.model.vocab_size, seq=seq)

    dense = build_model_chunks(dense_cfg)
    state = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(dense)} if len(dense) > 1 else dense[0].sharded_state_dict()
    loaded = dist_checkpointing.load(state, path)
    if len(dense) > 1:
        for i, c in enumerate(dense):
            c.load_state_dict(loaded[f"chunk{i}"])
    else:
        dense[0].load_state_dict(loaded)
    for c in dense:
        c.eval()
    dense_logits = run_schedule(dense, tokens)
    del dense

    by_naming = {}
    for naming in namings:
        os.environ[LAYER_NAMES_ENV] = naming
        try:
            moe = build_model_chunks(cfg)
            if naming != namings[0]:  # a dense model is named alike under both specs
                dense_keys = [sorted(i.key for i in sharded_items(c.sharded_state_dict()))
                              for c in build_model_chunks(dense_cfg)]
        finally:
            del os.environ[LAYER_NAMES_ENV]
        report = upcycle_from_dense(moe, cfg, TorchDistCheckpoint(path))
        for c in moe:
            c.eval()
        moe_logits = run_schedule(moe, tokens)
        if moe_logits is not None:
            diff = (moe_logits - dense_logits).abs()
            local_max, local_mean, scale = diff.max().item(), diff.mean().item(), dense_logits.abs().max().item()
        else:
            local_max = local_mean = scale = 0.0
        by_naming[naming] = {
            "max_abs_diff": _max_over_world(local_max),
            "mean_abs_diff": _max_over_world(local_mean),
            "logit_scale": _max_over_world(scale),
            "report": report.as_dict(),
            # What megatron-core's modules wrote: read back from their sharded state dict.
            "keys_naming": layer_naming_of_keys(i.key for c in moe for i in sharded_items(c.sharded_state_dict())),
        }
        if naming != namings[0]:
            by_naming[naming]["dense_keys_alike"] = dense_keys == [
                sorted(i.key for i in sharded_items(c.sharded_state_dict())) for c in build_model_chunks(dense_cfg)]
        del moe
    return {"rank": dist.get_rank(), **by_naming[namings[0]], "by_naming": by_naming}


_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list",
    "gather", "irecv", "isend", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "scatter", "send",
)


def upcycle_traffic(overrides: list[str], path: str) -> dict:
    """Upcycle at this layout while counting collectives and what was read from disk."""
    import torch.distributed.distributed_c10d as c10d

    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    cfg = _setup(overrides)
    chunks = build_model_chunks(cfg)
    source = TorchDistCheckpoint(path)
    calls: list[str] = []
    saved = {}
    for name in _COLLECTIVES:
        for module in (dist, c10d):
            original = getattr(module, name, None)
            if original is None:
                continue
            saved[(module, name)] = original

            def counting(*args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            setattr(module, name, counting)
    try:
        report = upcycle_from_dense(chunks, cfg, source)
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)

    # What this rank must hold, counting each dense FFN slice once per layer (G = 1).
    needed = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if ".router." in name:
                continue
            if ".experts.local_experts." in name and ".local_experts.0." not in name:
                continue
            needed += p.numel()
    total_bytes = sum(info.length for info in source.metadata.storage_data.values())
    return {
        "collectives": calls,
        "elements_read": report.elements_read,
        "elements_needed": needed,
        "bytes_read": report.bytes_read,
        "checkpoint_bytes": total_bytes,
    }
