"""Guard rails during training: stop on a non-finite loss, or when routing degrades.

Two checks, both reading the router statistics :class:`UpcycleMetrics` already collects
(nothing is collected twice):

* **non-finite loss** -- a forward hook on every megatron-core model chunk checks its
  output (the per-token loss on the last pipeline stage, activations on earlier ones)
  *before* the backward pass, so megatron's own NaN-gradient check never gets to raise
  its message without a step number, and no NaN update reaches the weights. The report
  names the step and this rank's per-layer router statistics of that step so far (no
  collective: the other ranks may be anywhere in the step; torchrun stops them when this
  rank exits).
* **router collapse** (optional, ``trainer.guard_max_dropped_fraction`` and
  ``trainer.guard_max_load_ratio``; null = off) -- after each step, on the statistics the
  metrics callback has already summed over all ranks, so every rank takes the same decision
  at the same step and all stop together. It runs before NeMo's checkpoint callback
  (Lightning orders checkpointing last), so a tripped step is never saved.

Either way the job raises :class:`TrainingStopped`; ``nemo_upcycle.train`` prints it and
exits with status 3. Relaunching resumes from the last complete checkpoint.
"""
from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch

from nemo_upcycle.metrics.router_stats import LayerRouterStats, uniform_entropy

EXIT_CODE = 3


class TrainingStopped(RuntimeError):
    """A guard stopped training. ``every_rank``: each rank's message differs (print them all)."""

    def __init__(self, message: str, every_rank: bool):
        super().__init__(message)
        self.every_rank = every_rank


# (max load ratio, dropped fraction, entropy / ln E) per layer
LayerRow = tuple[float, float, float]


def rows_from_stats(layers: dict[int, LayerRouterStats], num_experts: int) -> dict[int, LayerRow]:
    norm = uniform_entropy(num_experts)
    return {l: (s.max_load_ratio, s.dropped_fraction, s.mean_entropy / norm) for l, s in sorted(layers.items())}


def rows_from_record(record: dict) -> dict[int, LayerRow]:
    """The per-layer ``router/layer<l>/...`` entries of a metrics record."""
    rows = {}
    for key in record:
        if key.startswith("router/layer") and key.endswith("/max_load_ratio"):
            layer = int(key[len("router/layer"):].split("/")[0])
            prefix = f"router/layer{layer}/"
            rows[layer] = (record[prefix + "max_load_ratio"], record[prefix + "dropped_fraction"],
                           record[prefix + "entropy"])
    return dict(sorted(rows.items()))


def format_rows(rows: dict[int, LayerRow], flagged: frozenset = frozenset()) -> str:
    if not rows:
        return "  (no router statistics: no MoE layer ran on this rank yet in this step)"
    return "\n".join(
        f"  layer {l}: max load {load:.2f}x fair share, dropped {dropped:.3f} of tokens, "
        f"router entropy {entropy:.3f} of ln(E){'  <-- over the threshold' if l in flagged else ''}"
        for l, (load, dropped, entropy) in rows.items()
    )


def threshold_breaches(rows: dict[int, LayerRow], max_dropped: Optional[float],
                       max_load: Optional[float]) -> list[tuple[int, str]]:
    """(layer, sentence) for every layer over a threshold."""
    out = []
    for layer, (load, dropped, _) in rows.items():
        if max_dropped is not None and dropped > max_dropped:
            out.append((layer, f"layer {layer} dropped {dropped:.3f} of its tokens "
                               f"(trainer.guard_max_dropped_fraction={max_dropped})"))
        if max_load is not None and load > max_load:
            out.append((layer, f"layer {layer}'s busiest expert got {load:.2f}x its fair share "
                               f"(trainer.guard_max_load_ratio={max_load})"))
    return out


class TrainingGuards(pl.Callback):
    def __init__(self, cfg: Any, metrics):
        self.metrics = metrics  # UpcycleMetrics: its router statistics are reused
        self.max_dropped = cfg.trainer.guard_max_dropped_fraction
        self.max_load = cfg.trainer.guard_max_load_ratio
        self.lr = cfg.trainer.lr
        self._handles: list = []

    # -- non-finite loss -------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        from nemo_upcycle.training.callbacks import mcore_chunks

        for chunk in mcore_chunks(pl_module):
            self._handles.append(chunk.register_forward_hook(self._finite_output_hook(trainer)))

    def on_train_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _finite_output_hook(self, trainer):
        def hook(chunk, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            # One reduction to a bool per micro-batch; on GPU a sync, negligible beside a step.
            if bool(torch.isfinite(output).all()):
                return
            raise TrainingStopped(self._nonfinite_message(trainer, chunk, output), every_rank=True)

        return hook

    def _nonfinite_message(self, trainer, chunk, output: torch.Tensor) -> str:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        kind = "nan" if bool(torch.isnan(output).any()) else "inf"
        what = "the loss" if getattr(chunk, "post_process", True) else "this pipeline stage's activations"
        when = (f"in step {trainer.global_step + 1}" if chunk.training
                else f"during validation after step {trainer.global_step}")
        rows = rows_from_stats(self.metrics.local_router_stats(), max(self.metrics.num_experts, 1))
        return (
            f"training stopped {when}: {what} is {kind} on rank {rank}, before the backward pass "
            f"(nothing of this step was applied or saved).\nRouter statistics of rank {rank}'s "
            f"tokens in this step:\n{format_rows(rows)}\n"
            f"What to do: lower trainer.lr (now {self.lr}) or raise trainer.warmup_steps; keep "
            "trainer.clip_grad > 0; a dropped fraction near 1 or a max load near E/k points at "
            "router collapse (raise router.aux_loss_coeff). Relaunching the same command "
            "resumes from the last complete checkpoint."
        )

    # -- router collapse -------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.max_dropped is None and self.max_load is None:
            return
        record = self.metrics.last_record
        rows = rows_from_record(record)
        breaches = threshold_breaches(rows, self.max_dropped, self.max_load)
        if not breaches:
            return
        flagged = frozenset(layer for layer, _ in breaches)
        raise TrainingStopped(
            f"training stopped after step {record['step']}: "
            + "; ".join(sentence for _, sentence in breaches)
            + f".\nRouter statistics of step {record['step']} (all ranks):\n{format_rows(rows, flagged)}\n"
            "What to do: this is an early sign of router collapse: raise router.aux_loss_coeff or "
            "moe.capacity_factor, lower trainer.lr, or raise (or set to null) the threshold. "
            "This step was not saved; relaunching resumes from the last complete checkpoint.",
            every_rank=False,
        )
