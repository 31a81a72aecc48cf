"""The step-0 check: the dense model and its online-upcycled MoE on the same real tokens.

Both are built at the job's layout and read through the same dense source; when that source
is (or came from) a Hugging Face folder, transformers runs the dense model too, because a
setting read wrongly from the checkpoint is invisible to a dense-vs-MoE comparison.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.platform.device import collective_device


def _all_reduce(value: float, op=dist.ReduceOp.MAX) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def _eval_logits(chunks, tokens):
    from nemo_upcycle.model.forward import run_schedule

    for c in chunks:
        c.eval()
    with torch.no_grad():
        return run_schedule(chunks, tokens)


def verify_seq_length(cfg: DictConfig) -> tuple[int, str]:
    """``verify.seq_length`` rounded down to a multiple the layout allows, and a note when rounded.

    Rounded, not refused: the default (128) is one number for every layout, and any length
    checks the upcycling equally well; e.g. tp=3 with sequence parallelism runs 126 tokens
    (megatron-core otherwise fails in the forward pass, after every weight was read). The
    validation refuses lengths shorter than one multiple.
    """
    from nemo_upcycle.config.checks.sequence import why_multiple
    from nemo_upcycle.config.parallel_sizes import sequence_multiple

    asked, multiple = int(cfg.verify.seq_length), sequence_multiple(cfg.parallel)
    length = asked - asked % multiple
    if length == asked:
        return asked, ""
    return length, (f"verify.seq_length={asked} rounded down to {length}, a multiple of {multiple}: "
                    f"{why_multiple(cfg.parallel)}")


def run_verify(cfg: DictConfig) -> dict:
    """Logit differences (dense vs MoE, megatron vs transformers) and tolerances, on every rank."""
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder
    from nemo_upcycle.platform.launcher_env import print_rank0
    from nemo_upcycle.data.text import heldout_batch
    from nemo_upcycle.metrics.router_stats import RouterStatsCollector
    from nemo_upcycle.model.modeling import build_model_chunks, params_dtype_for
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.upcycle.exactness import inexact_reason, logit_tolerance, rounding_tolerance
    from nemo_upcycle.upcycle.spec import UpcycleSpec

    source = open_dense_source(cfg)  # imports the embedded model if needed; checks the architecture
    setup_parallel(cfg.parallel, cfg.seed)
    seq_length, rounding = verify_seq_length(cfg)
    if rounding:
        print_rank0(rounding)
    tokens = heldout_batch(tokenizer_folder(cfg), cfg.model.vocab_size, cfg.verify.batch, seq_length)

    dense_cfg = OmegaConf.merge(cfg, {"moe": {"num_experts": 0, "topk": 0, "layers": []}})
    dense = build_model_chunks(dense_cfg)
    upcycle_from_dense(dense, dense_cfg, source)
    dense_logits = _eval_logits(dense, tokens)
    del dense
    reference = transformers_logits(cfg, source, tokens, dense_logits is not None)
    import_diff = reference_difference(reference, dense_logits)

    moe = build_model_chunks(cfg)
    report = upcycle_from_dense(moe, cfg, source)
    with RouterStatsCollector(moe) as stats:
        moe_logits = _eval_logits(moe, tokens)
    spec = UpcycleSpec.of(cfg)
    if spec.num_experts:
        stats.all_reduce(cfg.model.num_layers, spec.num_experts, spec.topk)

    local = (0.0, 0.0, 0, 0.0)
    if moe_logits is not None:
        diff = (moe_logits - dense_logits).abs()
        local = (diff.max().item(), diff.sum().item(), diff.numel(), dense_logits.abs().max().item())
    mean = _all_reduce(local[1], dist.ReduceOp.SUM) / max(_all_reduce(local[2], dist.ReduceOp.SUM), 1)
    logit_scale = _all_reduce(local[3])
    device = collective_device()
    bytes_read = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(bytes_read, torch.tensor([report.bytes_read], device=device))
    if dist.get_rank() == 0:
        print_upcycling(cfg, stats, spec, report, [int(b) for b in bytes_read])
    dtype, layers = params_dtype_for(cfg), cfg.model.num_layers
    if import_diff is not None:
        # The upcycled model against the independent side directly, not only through our dense model.
        import_diff["upcycled_max"] = reference_difference(reference, moe_logits)["max"]
    return {"max": _all_reduce(local[0]), "mean": mean, "dtype": dtype, "logit_scale": logit_scale,
            "tolerance": logit_tolerance(cfg, dtype, logit_scale), "reason": inexact_reason(cfg),
            "import": import_diff, "import_tolerance": rounding_tolerance(dtype, logit_scale, layers)}


def print_upcycling(cfg: DictConfig, stats, spec, report, bytes_per_rank: list[int]) -> None:
    """Rank 0: the router statistics table and what each rank's upcycling read."""
    from rich.console import Console

    console = Console()
    if stats.layers:
        console.print(router_table(cfg, stats, spec))
    console.print(
        f"upcycling read {sum(bytes_per_rank) / 1e6:.1f} MB over {len(bytes_per_rank)} ranks "
        f"(per rank: {', '.join(f'{b / 1e6:.1f}' for b in bytes_per_rank)} MB) in {report.seconds:.2f}s; "
        f"{report.expert_copies} expert tensors copied in memory, {report.routers_initialised} routers initialised"
    )


def transformers_logits(cfg: DictConfig, source, tokens, holds_logits: bool):
    """transformers' dense logits on ``tokens`` (this rank's vocabulary slice), when the dense
    source is (or came from) a Hugging Face folder: (folder, logits or None on ranks without
    logits); None when there is no such folder or ``verify.transformers=false``."""
    from megatron.core import parallel_state

    from nemo_upcycle.checkpoint.hf.transformers_reference import reference_folder, vocab_slice_logits
    from nemo_upcycle.platform.launcher_env import print_rank0

    if not cfg.verify.transformers:
        return None
    folder = Path(cfg.verify.reference) if cfg.verify.reference else reference_folder(source)
    if folder is None:
        print_rank0("import check skipped: the dense checkpoint is not (and was not imported from) "
                    "a Hugging Face folder that transformers can load")
        return None
    if not holds_logits:
        return folder, None
    return folder, vocab_slice_logits(folder, tokens, parallel_state.get_tensor_model_parallel_rank(),
                                      parallel_state.get_tensor_model_parallel_world_size())


def reference_difference(reference, logits) -> Optional[dict]:
    """Max abs difference (over every rank) of megatron-core's ``logits`` from transformers'."""
    if reference is None:
        return None
    folder, expected = reference
    local = 0.0
    if logits is not None:
        local = (logits - expected.to(logits.device)).abs().max().item()
    return {"max": _all_reduce(local), "folder": str(folder)}


def router_table(cfg: DictConfig, stats, spec):
    from rich.table import Table

    from nemo_upcycle.metrics.router_stats import uniform_entropy

    table = Table(title=f"router statistics at step 0 ({cfg.router.type}, {spec.num_experts} experts, top-{spec.topk})")
    for col in ("layer", "tokens", "load per expert (fraction)", "max/fair", "entropy / ln(E)", "dropped"):
        table.add_column(col, justify="right")
    for layer, s in sorted(stats.layers.items()):
        load = " ".join(f"{x:.2f}" for x in s.load.tolist())
        table.add_row(str(layer), f"{s.tokens:.0f}", load, f"{s.max_load_ratio:.2f}",
                      f"{s.mean_entropy / uniform_entropy(spec.num_experts):.3f}", f"{s.dropped_fraction:.3f}")
    return table


def verdict(result: dict) -> tuple[list[str], bool]:
    """The lines verify prints for ``result``, and whether a check failed."""
    from nemo_upcycle.platform.device import describe
    from nemo_upcycle.upcycle.exactness import tolerance_rule

    lines, failed = [f"verify ran in {describe(result['dtype'])} (trainer.precision), "
                     f"dense logits up to {result['logit_scale']:.3g} in magnitude"], False
    imported = result["import"]
    if imported is not None:
        ok = imported["max"] <= result["import_tolerance"]
        failed |= not ok
        lines.append(
            f"{'OK' if ok else 'FAILED'}: megatron-core's dense model vs transformers on {imported['folder']}: "
            f"max abs logit difference {imported['max']:.3e} (tolerance {result['import_tolerance']:.2e})"
            + ("" if ok else "; the checkpoint's configuration was read wrongly"))
    if result["tolerance"] is None:
        lines.append(f"not expected to match the dense model exactly: {result['reason']}")
    elif result["max"] > result["tolerance"]:
        failed = True
        lines.append(f"FAILED: max abs logit difference {result['max']:.3e} exceeds tolerance "
                     f"{result['tolerance']:.2e} ({tolerance_rule(result['dtype'])})")
    else:
        lines.append(f"OK: the upcycled model reproduces the dense logits within {result['tolerance']:.2e} "
                     f"({tolerance_rule(result['dtype'])})")
    if imported is not None and result["tolerance"] is not None:
        # Two computations apart from transformers' by rounding each: twice the tolerance.
        ok = imported["upcycled_max"] <= 2 * result["tolerance"]
        failed |= not ok
        lines.append(f"{'OK' if ok else 'FAILED'}: the upcycled model vs transformers' dense model: max abs logit "
                     f"difference {imported['upcycled_max']:.3e} (tolerance {2 * result['tolerance']:.2e})")
    if imported is not None:
        lines.append(f"import_max_abs_logit_diff={imported['max']:.6e} "
                     f"upcycled_vs_transformers_max_abs_logit_diff={imported['upcycled_max']:.6e}")
    lines.append(f"max_abs_logit_diff={result['max']:.6e} mean_abs_logit_diff={result['mean']:.6e}")
    return lines, failed
