"""Training metrics: throughput and MFU, router health, a per-expert load plot.

Everything is written to TensorBoard (NeMo's logger), to ``<log_dir>/metrics.jsonl`` (one
line per step, read by the ablation runner and the demo) and, every
``trainer.log_every_n_steps``, to the console by rank 0: the job's progress line
(``step 3/40 | loss ... | eta 1m05s``). :class:`CheckpointMessages` says when a checkpoint is
complete.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger

from nemo_upcycle.metrics.router_stats import RouterStatsCollector, uniform_entropy
from nemo_upcycle.upcycle.spec import UpcycleSpec

log = logging.getLogger(__name__)


def peak_flops_per_device(override_tflops: Optional[float]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device: ``trainer.peak_tflops``, or the planner's table
    entry for the name torch reports. None on CPU, and on a GPU the table does not name
    (MFU is then not reported, and rank 0 says which setting supplies it)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    from nemo_upcycle.planner.budget import gpu_for_device_name
    from nemo_upcycle.platform.launcher_env import is_rank0

    name = torch.cuda.get_device_name()
    gpu = gpu_for_device_name(name)
    if gpu is None:
        if is_rank0():
            log.warning(f"MFU is not reported: the peak FLOP/s table (nemo_upcycle/planner/budget.py) does not "
                        f"know the device {name!r}; set trainer.peak_tflops=<its dense bf16 TFLOP/s>")
        return None
    return gpu.bf16_tflops * 1e12


def mcore_chunks(pl_module) -> list:
    """The megatron GPTModel chunks inside NeMo's wrappers."""
    from megatron.core.models.gpt import GPTModel

    return [m for m in pl_module.modules() if isinstance(m, GPTModel)]


class UpcycleMetrics(pl.Callback):
    def __init__(self, cfg: Any, log_dir: Path, flops_per_token: float, plot_layer: Optional[int] = None):
        self.cfg = cfg
        self.log_dir = Path(log_dir)
        self.flops_per_token = flops_per_token
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.trainer.seq_length
        self.peak = peak_flops_per_device(cfg.trainer.peak_tflops)
        spec = UpcycleSpec.of(cfg)
        self.num_experts, self.topk = spec.num_experts, spec.topk
        self.plot_layer = plot_layer
        self.load_history: list[list[float]] = []
        self._collector: Optional[RouterStatsCollector] = None
        self._started = 0.0
        self._first_step_done: Optional[tuple[int, float]] = None  # (step, time): for the ETA
        # The latest step's record, router statistics summed over ranks (read by guards.py).
        self.last_record: dict[str, Any] = {}

    # -- hooks ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        # Every rank creates the group here, together; metrics reduce over it only.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._rank = dist.get_rank() if dist.is_initialized() else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.num_experts and self._collector is None:
            self._collector = RouterStatsCollector(mcore_chunks(pl_module)).__enter__()
        if self._collector is not None:
            self._collector.layers.clear()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_time = time.perf_counter() - self._started
        world = dist.get_world_size() if dist.is_initialized() else 1
        tokens_per_s = self.tokens_per_step / step_time
        record: dict[str, Any] = {
            "step": trainer.global_step,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
        }
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * world)
        loss = trainer.callback_metrics.get("reduced_train_loss")
        if loss is not None:
            record["loss"] = float(loss)
        lr = trainer.callback_metrics.get("lr")
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        if lr is not None:
            record["lr"] = float(lr)
        record.update(self._router_metrics())
        self.last_record = record
        self._emit(trainer, record)

    def on_train_end(self, trainer, pl_module):
        if self._collector is not None:
            self._collector.__exit__(None, None, None)
        if self.load_history and self._rank == 0:
            plot_expert_load(self.load_history, self.plot_layer, self.log_dir / f"expert_load_layer{self.plot_layer}.png")

    def local_router_stats(self) -> dict:
        """This rank's per-layer router statistics of the current step so far (not summed
        over ranks: safe to read mid-step, e.g. when the step fails)."""
        return dict(self._collector.layers) if self._collector is not None else {}

    # -- helpers -------------------------------------------------------------------------
    def _router_metrics(self) -> dict:
        if self._collector is None:
            return {}
        self._collector.all_reduce(self.cfg.model.num_layers, self.num_experts, self.topk, self._group)
        layers = self._collector.layers
        if not layers:
            return {}
        if self.plot_layer is None:
            self.plot_layer = min(layers)
        if self.plot_layer in layers:
            self.load_history.append(layers[self.plot_layer].load.tolist())
        norm = uniform_entropy(self.num_experts)
        out = {
            "dropped_fraction": sum(s.dropped_fraction for s in layers.values()) / len(layers),
            "max_load_ratio": max(s.max_load_ratio for s in layers.values()),
            "router_entropy": sum(s.mean_entropy for s in layers.values()) / len(layers) / norm,
        }
        for layer, s in layers.items():
            out[f"router/layer{layer}/max_load_ratio"] = s.max_load_ratio
            out[f"router/layer{layer}/dropped_fraction"] = s.dropped_fraction
            out[f"router/layer{layer}/entropy"] = s.mean_entropy / norm
        out.update(_aux_losses())
        return out

    def _emit(self, trainer, record: dict) -> None:
        if self._rank != 0:
            return
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for logger in trainer.loggers:
            logger.log_metrics({f"upcycle/{k}": v for k, v in numeric.items()}, step=record["step"])
        self.log_dir.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in record.items() if not k.startswith("router/")}
        with open(self.log_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(summary) + "\n")
        now, total = time.perf_counter(), trainer.max_steps
        if self._first_step_done is None:
            self._first_step_done = (record["step"], now)
        if record["step"] % max(1, self.cfg.trainer.log_every_n_steps) == 0 or record["step"] == total:
            first, since = self._first_step_done
            eta = None
            if total and total > 0 and record["step"] > first:  # wall time per step, validation and saves included
                eta = (now - since) / (record["step"] - first) * (total - record["step"])
            print(console_line(record, total, eta), flush=True)


_CONSOLE_FIELDS = (
    ("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{:.0f} tok/s"),
    ("step_time_s", "{:.2f}s/step"), ("mfu", "MFU {:.1%}"), ("dropped_fraction", "dropped {:.3f}"),
    ("max_load_ratio", "max load {:.2f}x"),
)


def console_line(record: dict, total: Optional[int] = None, eta_s: Optional[float] = None) -> str:
    parts = [f"step {record['step']}" + (f"/{total}" if total and total > 0 else "")]
    parts += [fmt.format(record[key]) for key, fmt in _CONSOLE_FIELDS if record.get(key) is not None]
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class CheckpointMessages(Logger):
    """Says on the console when a checkpoint is complete, and where it is.

    A Lightning logger that only listens to ``after_save_checkpoint``: Lightning (NeMo's
    ModelCheckpoint) calls it on rank 0 once a save is finalized, after the last byte of an
    asynchronous save too. NeMo's own save messages go to the log file.
    """

    @property
    def name(self) -> str:
        return "checkpoint_messages"

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        path = str(getattr(checkpoint_callback, "last_model_path", "") or "")
        if path:
            log.info("checkpoint saved: %s", path.removesuffix(".ckpt"))


def _aux_losses() -> dict:
    """Load-balancing / z losses megatron recorded this step (then cleared)."""
    try:
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )
    except ImportError:
        return {}
    out = {}
    for name, entry in get_moe_layer_wise_logging_tracker().items():
        values = entry.get("values")
        if values is not None and values.numel():
            # This rank's layers only: the mean over the layers that recorded a value.
            out[name] = float(values.float().sum()) / max(int((values != 0).sum()), 1)
    clear_aux_losses_tracker()
    return out


def plot_expert_load(history: list[list[float]], layer: Optional[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = torch.tensor(history)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = range(1, loads.shape[0] + 1)
    ax.stackplot(steps, loads.T.numpy(), labels=[f"expert {e}" for e in range(loads.shape[1])])
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of routed tokens")
    ax.set_title(f"Per-expert load, layer {layer}")
    ax.set_xlim(1, max(2, loads.shape[0]))
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.rename(path)
