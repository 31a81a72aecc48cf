"""Rank functions for tests/test_planning.py: real megatron-core models, DDP buffers and
optimizers, measured so that the planner's arithmetic can be compared with them."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def _compose(overrides: list[str]):
    from nemo_upcycle.config.compose import compose_config

    return compose_config(overrides)


def _init(cfg) -> None:
    """Process group once per process; megatron's groups again for every layout."""
    from nemo_upcycle.platform.distributed import init_megatron_parallel, init_process_group

    init_process_group(timeout_s=120)
    init_megatron_parallel(cfg.parallel, cfg.seed)


def _ranks() -> dict:
    from megatron.core import parallel_state as ps

    return dict(
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
    )


def _param_counts(chunks) -> dict:
    seen, total, expert = set(), 0, 0
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if ".experts." in name:
                expert += p.numel()
    return dict(params=total, expert_params=expert)


def _dense_shapes(overrides: list[str]) -> dict:
    """Global shapes of the dense checkpoint's tensors this rank needs (from a dense model)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from nemo_upcycle.model.modeling import build_model_chunks

    dense_cfg = _compose(overrides + ["moe=dense", "parallel.ep=1", "parallel.etp=null"])
    shapes = {}
    for chunk in build_model_chunks(dense_cfg):
        for sh in nested_values(chunk.sharded_state_dict()):
            # SwiGLU fc1 under TP is a factory of ShardedTensors (what the checkpoint stores)
            built = nested_values(sh.build()) if isinstance(sh, ShardedTensorFactory) else [sh]
            for ten in built:
                if isinstance(ten, ShardedTensor):
                    shapes[ten.key] = tuple(ten.global_shape)
    return shapes


def layout_counts(layouts: list[list[str]]) -> list[dict]:
    """For each layout: this rank's parameter counts and elements the upcycle plan reads."""
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.upcycle.plan import build_plan

    results = []
    for overrides in layouts:
        cfg = _compose(overrides)
        _init(cfg)
        chunks = build_model_chunks(cfg)
        result = dict(_ranks(), overrides=overrides, **_param_counts(chunks))
        plan = build_plan(chunks, cfg, _dense_shapes(overrides))
        result["elements_read"] = plan.elements_requested()
        results.append(result)
        del chunks
    return results


def meta_counts(overrides: list[str]) -> dict:
    """Parameter counts of a (large) model built on the meta device: shapes, no memory."""
    from nemo_upcycle.model.modeling import build_model_chunks

    cfg = _compose(overrides)
    _init(cfg)
    with torch.device("meta"):
        chunks = build_model_chunks(cfg)
    devices = {p.device.type for c in chunks for p in c.parameters()}
    return dict(_ranks(), devices=sorted(devices), **_param_counts(chunks))


# Memory of model states --------------------------------------------------------------------


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _train_step(ddp_chunks, optimizer, vocab: int, seq: int, micro: int):
    from nemo_upcycle.model.forward import _causal_mask, _position_ids

    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, vocab, (micro, seq), generator=g)
    labels = torch.randint(0, vocab, (micro, seq), generator=g)
    (model,) = ddp_chunks
    optimizer.zero_grad()
    loss = model(tokens, _position_ids(tokens), _causal_mask(tokens), labels=labels)
    loss.float().mean().backward()
    model.finish_grad_sync()
    optimizer.step()


def model_state_memory(overrides: list[str], distributed: bool, bf16: bool, seq: int = 16) -> dict:
    """Bytes that megatron-core's model, DDP gradient buffers and Adam optimizer allocate after
    one training step, by category (each storage counted once, in the first category it meets)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_upcycle.model.modeling import build_model_chunks, build_transformer_config

    cfg = _compose(overrides)
    _init(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = build_transformer_config(cfg, params_dtype=dtype)
    chunks = build_model_chunks(cfg, config)
    counts = _param_counts(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed, overlap_grad_reduce=False
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, params_dtype=dtype,
                        use_distributed_optimizer=distributed, clip_grad=1.0),
        ddp_chunks,
    )
    _train_step(ddp_chunks, optimizer, cfg.model.vocab_size, seq, 1)

    seen: set = set()
    weights = _storage_bytes([p for c in ddp_chunks for p in c.module.parameters()], seen)
    buffers = [b for c in ddp_chunks for b in list(c.buffers) + list(c.expert_parallel_buffers)]
    grads = _storage_bytes([b.grad_data for b in buffers], seen)
    opt_tensors = []
    for inner in _inner_optimizers(optimizer):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            opt_tensors.extend(group["params"])
        for state in torch_opt.state.values():
            opt_tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
    optim = _storage_bytes(opt_tensors, seen)
    return dict(_ranks(), **counts, weights=weights, grads=grads, optimizer=optim,
                optimizer_type=type(optimizer).__name__,
                inner=[type(o).__name__ for o in _inner_optimizers(optimizer)])


# Activations ------------------------------------------------------------------------------


@contextlib.contextmanager
def _count_saved(params: set, into: dict):
    """Bytes autograd saves for backward: unique storages, model weights excluded."""
    seen: set = set()

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and storage.nbytes():
            seen.add(key)
            into["bytes"] = into.get("bytes", 0) + storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def saved_activations(overrides: list[str], micro: int, seq: int) -> dict:
    """Bytes autograd saves during one forward pass (with the loss) of this rank's model (pp=1)."""
    from nemo_upcycle.model.forward import _causal_mask, _position_ids
    from nemo_upcycle.model.modeling import build_model_chunks

    cfg = _compose(overrides)
    _init(cfg)
    (model,) = build_model_chunks(cfg)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro, seq), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (micro, seq), generator=g)
    measured: dict = {}
    with _count_saved(params, measured):
        loss = model(tokens, _position_ids(tokens), _causal_mask(tokens), labels=labels)
    loss.float().mean().backward()
    return dict(_ranks(), saved_bytes=measured.get("bytes", 0))


def sequence(calls: list) -> list:
    """Run several of the functions above in one launch: ``[[name, kwargs], ...]``."""
    return [globals()[name](**kwargs) for name, kwargs in calls]
