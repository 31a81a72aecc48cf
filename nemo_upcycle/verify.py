"""torchrun --nproc_per_node=N -m nemo_upcycle.verify model=... moe=... router=... parallel.*=...

Runs the dense model and the online-upcycled MoE model at the requested layout on the same
real tokens, prints per-layer router statistics, and ends with
``max_abs_logit_diff=<v> mean_abs_logit_diff=<v>``. When the dense checkpoint is (or was
imported from) a Hugging Face folder, the dense model is also run in transformers on the
same tokens (``import_max_abs_logit_diff=<v>``): a setting read wrongly from the checkpoint
shows there, where dense-vs-MoE cannot see it. Exits 1 when a difference exceeds its
tolerance (see nemo_upcycle.upcycle.exactness); ``verify.seq_length``, ``verify.batch``,
``verify.transformers=false`` change the check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def run_verify(cfg: DictConfig) -> dict:
    from rich.console import Console

    from nemo_upcycle.checkpoint.dense_source import open_dense_source, tokenizer_folder
    from nemo_upcycle.forward import run_schedule
    from nemo_upcycle.metrics.router_stats import RouterStatsCollector
    from nemo_upcycle.modeling import build_model_chunks, default_params_dtype, fine_topk, num_fine_experts
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.text import heldout_batch
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.upcycle.exactness import TOLERANCE, inexact_reason, logit_tolerance

    source = open_dense_source(cfg)  # imports the embedded model if needed; checks the architecture
    setup_parallel(cfg.parallel, cfg.seed)
    tokens = heldout_batch(tokenizer_folder(cfg), cfg.model.vocab_size, cfg.verify.batch, cfg.verify.seq_length)

    dense_cfg = OmegaConf.merge(cfg, {"moe": {"num_experts": 0, "topk": 0, "layers": []}})
    dense = build_model_chunks(dense_cfg)
    upcycle_from_dense(dense, dense_cfg, source)
    for c in dense:
        c.eval()
    with torch.no_grad():
        dense_logits = run_schedule(dense, tokens)
    del dense
    import_diff = transformers_difference(cfg, source, tokens, dense_logits)

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
            console.print(router_table(cfg, stats, n_experts))
        console.print(
            f"upcycling read {sum(int(b) for b in bytes_read) / 1e6:.1f} MB over {dist.get_world_size()} ranks "
            f"(per rank: {', '.join(f'{int(b) / 1e6:.1f}' for b in bytes_read)} MB) in {report.seconds:.2f}s; "
            f"{report.expert_copies} expert tensors copied in memory, {report.routers_initialised} routers initialised"
        )
    dtype = default_params_dtype()
    return {"max": max_diff, "mean": mean_diff, "tolerance": logit_tolerance(cfg, dtype),
            "reason": inexact_reason(cfg), "import": import_diff,
            "import_tolerance": IMPORT_TOLERANCE.get(dtype, TOLERANCE.get(dtype, 1.5e-1))}


# megatron-core and transformers sum in different orders: fp32 rounding over many layers.
IMPORT_TOLERANCE = {torch.float32: 1e-3}


def transformers_difference(cfg: DictConfig, source, tokens, dense_logits) -> Optional[dict]:
    """Max abs difference of megatron-core's dense logits from transformers' on the same
    tokens, when the dense source is (or came from) a Hugging Face folder; None otherwise."""
    from megatron.core import parallel_state

    from nemo_upcycle.checkpoint.transformers_reference import reference_folder, vocab_slice_logits

    if not cfg.verify.transformers:
        return None
    folder = Path(cfg.verify.reference) if cfg.verify.reference else reference_folder(source)
    if folder is None:
        print_rank0("import check skipped: the dense checkpoint is not (and was not imported from) "
                    "a Hugging Face folder that transformers can load")
        return None
    local = 0.0
    if dense_logits is not None:
        reference = vocab_slice_logits(folder, tokens, parallel_state.get_tensor_model_parallel_rank(),
                                       parallel_state.get_tensor_model_parallel_world_size())
        local = (dense_logits - reference).abs().max().item()
    return {"max": _max_all(local), "folder": str(folder)}


def router_table(cfg: DictConfig, stats, n_experts: int):
    from rich.table import Table

    from nemo_upcycle.metrics.router_stats import uniform_entropy
    from nemo_upcycle.modeling import fine_topk

    table = Table(title=f"router statistics at step 0 ({cfg.router.type}, {n_experts} experts, top-{fine_topk(cfg.moe)})")
    for col in ("layer", "tokens", "load per expert (fraction)", "max/fair", "entropy / ln(E)", "dropped"):
        table.add_column(col, justify="right")
    for layer, s in sorted(stats.layers.items()):
        load = " ".join(f"{x:.2f}" for x in s.load.tolist())
        table.add_row(str(layer), f"{s.tokens:.0f}", load, f"{s.max_load_ratio:.2f}",
                      f"{s.mean_entropy / uniform_entropy(n_experts):.3f}", f"{s.dropped_fraction:.3f}")
    return table


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with validated(cfg, launch_world_size()):
        result = run_verify(cfg)
    failed = False
    imported = result["import"]
    if imported is not None:
        ok = imported["max"] <= result["import_tolerance"]
        failed |= not ok
        print_rank0(
            f"{'OK' if ok else 'FAILED'}: megatron-core's dense model vs transformers on {imported['folder']}: "
            f"max abs logit difference {imported['max']:.3e} (tolerance {result['import_tolerance']:.0e})"
            + ("" if ok else "; the checkpoint's configuration was read wrongly")
        )
    if result["tolerance"] is None:
        print_rank0(f"not expected to match the dense model exactly: {result['reason']}")
    elif result["max"] > result["tolerance"]:
        failed = True
        print_rank0(f"FAILED: max abs logit difference {result['max']:.3e} exceeds tolerance {result['tolerance']:.0e}")
    else:
        print_rank0(f"OK: the upcycled model reproduces the dense logits within {result['tolerance']:.0e}")
    if imported is not None:
        print_rank0(f"import_max_abs_logit_diff={imported['max']:.6e}")
    print_rank0(f"max_abs_logit_diff={result['max']:.6e} mean_abs_logit_diff={result['mean']:.6e}")
    if failed:
        fail(1)
    from nemo_upcycle.platform.distributed import teardown_parallel

    teardown_parallel()


if __name__ == "__main__":
    main()
