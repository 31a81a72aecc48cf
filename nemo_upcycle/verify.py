"""torchrun --nproc_per_node=N -m nemo_upcycle.verify model=... moe=... router=... parallel.*=...

Runs the dense model and the online-upcycled MoE model at the requested layout on the same
real tokens, prints per-layer router statistics, and ends with
``max_abs_logit_diff=<v> mean_abs_logit_diff=<v>``. Exits non-zero when the difference
exceeds the tolerance the configuration implies (see nemo_upcycle.upcycle.exactness).
"""
from __future__ import annotations


import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.cli import CONFIG_DIR, fail, launch_world_size, print_rank0, validated
from nemo_upcycle.config.schema import register_configs

register_configs()


def _max_all(value: float, op=dist.ReduceOp.MAX) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def run_verify(cfg: DictConfig, batch: int = 2, seq: int = 128) -> dict:
    from rich.console import Console
    from rich.table import Table

    from nemo_upcycle.dense_source import open_dense_source, resolve_paths
    from nemo_upcycle.forward import run_schedule
    from nemo_upcycle.metrics.router_stats import RouterStatsCollector, uniform_entropy
    from nemo_upcycle.modeling import build_model_chunks, default_params_dtype, fine_topk, num_fine_experts
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.text import heldout_batch
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.upcycle.exactness import inexact_reason, logit_tolerance

    source = open_dense_source(cfg)  # imports the embedded model if needed; checks shapes
    _, tokenizer = resolve_paths(cfg)
    setup_parallel(cfg.parallel, cfg.seed)
    tokens = heldout_batch(tokenizer, cfg.model.vocab_size, batch, seq)

    dense_cfg = OmegaConf.merge(cfg, {"moe": {"num_experts": 0, "topk": 0, "layers": []}})
    dense = build_model_chunks(dense_cfg)
    upcycle_from_dense(dense, dense_cfg, source)
    for c in dense:
        c.eval()
    with torch.no_grad():
        dense_logits = run_schedule(dense, tokens)
    del dense

    moe = build_model_chunks(cfg)
    report = upcycle_from_dense(moe, cfg, source)
    for c in moe:
        c.eval()
    with torch.no_grad(), RouterStatsCollector(moe) as stats:
        moe_logits = run_schedule(moe, tokens)
    n_experts = num_fine_experts(cfg.moe)
    if n_experts:
        stats.all_reduce(cfg.model.num_layers, n_experts, fine_topk(cfg.moe))

    if moe_logits is not None:
        diff = (moe_logits - dense_logits).abs()
        local = (diff.max().item(), diff.sum().item(), diff.numel())
    else:
        local = (0.0, 0.0, 0)
    max_diff = _max_all(local[0])
    mean_diff = _max_all(local[1], dist.ReduceOp.SUM) / max(_max_all(local[2], dist.ReduceOp.SUM), 1)
    bytes_read = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(bytes_read, torch.tensor([report.bytes_read]))

    if dist.get_rank() == 0:
        console = Console()
        if stats.layers:
            table = Table(title=f"router statistics at step 0 ({cfg.router.type}, {n_experts} experts, top-{fine_topk(cfg.moe)})")
            for col in ("layer", "tokens", "load per expert (fraction)", "max/fair", "entropy / ln(E)", "dropped"):
                table.add_column(col, justify="right")
            for layer, s in sorted(stats.layers.items()):
                load = " ".join(f"{x:.2f}" for x in s.load.tolist())
                table.add_row(str(layer), f"{s.tokens:.0f}", load, f"{s.max_load_ratio:.2f}",
                              f"{s.mean_entropy / uniform_entropy(n_experts):.3f}", f"{s.dropped_fraction:.3f}")
            console.print(table)
        console.print(
            f"upcycling read {sum(int(b) for b in bytes_read) / 1e6:.1f} MB over {dist.get_world_size()} ranks "
            f"(per rank: {', '.join(f'{int(b) / 1e6:.1f}' for b in bytes_read)} MB) in {report.seconds:.2f}s; "
            f"{report.expert_copies} expert tensors copied in memory, {report.routers_initialised} routers initialised"
        )
    reason = inexact_reason(cfg)
    tolerance = logit_tolerance(cfg, default_params_dtype())
    return {"max": max_diff, "mean": mean_diff, "tolerance": tolerance, "reason": reason}


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with validated(cfg, launch_world_size()):
        result = run_verify(cfg)
    if result["tolerance"] is None:
        print_rank0(f"not expected to match the dense model exactly: {result['reason']}")
    elif result["max"] > result["tolerance"]:
        print_rank0(f"FAILED: max abs logit difference {result['max']:.3e} exceeds tolerance {result['tolerance']:.0e}")
    else:
        print_rank0(f"OK: the upcycled model reproduces the dense logits within {result['tolerance']:.0e}")
    print_rank0(f"max_abs_logit_diff={result['max']:.6e} mean_abs_logit_diff={result['mean']:.6e}")
    if result["tolerance"] is not None and result["max"] > result["tolerance"]:
        fail(1)
    from nemo_upcycle.platform.distributed import teardown_parallel

    teardown_parallel()


if __name__ == "__main__":
    main()
