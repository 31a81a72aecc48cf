"""The training job: NeMo 2's trainer around the online-upcycled MoE model.

Read top to bottom: resolve the dense model and the data, decide whether this launch
upcycles (first launch) or resumes (an MoE checkpoint exists), build NeMo's strategy,
optimizer, logger and trainer, and fit.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_upcycle.checkpoint.trained_checkpoint import RUN_NAME, checkpoint_dir
from nemo_upcycle.model.modeling import params_dtype_for, trains_in_bf16
from nemo_upcycle.platform.device import gpu_available
from nemo_upcycle.platform.launcher_env import read_launch_env

log = logging.getLogger(__name__)


def resumable_checkpoint(cfg: Any) -> Optional[Path]:
    """The checkpoint NeMo's AutoResume will resume from, or None on a first launch.

    Uses AutoResume's own search (complete ``*last``/``*end`` checkpoints, unfinished ones
    skipped), so "upcycle or resume" is decided exactly as the trainer will act.
    """
    from nemo.lightning import AutoResume

    ckpt_dir = checkpoint_dir(cfg)
    if not ckpt_dir.is_dir():
        return None
    resume = AutoResume(resume_from_directory=str(ckpt_dir), resume_if_exists=True,
                        resume_ignore_no_checkpoint=True)
    return resume._find_trainer_ckpt_path()


def adopt_checkpoint_to_resume(cfg: Any) -> Optional[Path]:
    """On a relaunch, make ``cfg`` describe the checkpoint it resumes from; None on a first launch.

    ``model``/``moe``/``router`` become the configuration stored in the checkpoint (an override
    on the command line that contradicts it is refused, one that agrees is accepted) and the
    tokenizer the copy in its context, so the dense checkpoint the first launch upcycled from
    is never opened again: it may since have been moved or deleted.
    """
    from nemo_upcycle.checkpoint.stored_config import apply_stored_job, explicit_overrides
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint

    resume_from = resumable_checkpoint(cfg)
    if resume_from is not None:
        apply_stored_job(cfg, find_checkpoint(resume_from), explicit_overrides())
    return resume_from


def _tokenizer(tokenizer_path: Optional[Path]):
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    if tokenizer_path is None:
        raise ValueError("training needs a tokenizer: set model.tokenizer to a Hugging Face tokenizer folder")
    return AutoTokenizer(str(tokenizer_path))


def build_trainer(cfg: Any, callbacks: list):
    import nemo.lightning as nl
    from megatron.core.distributed import DistributedDataParallelConfig

    from nemo_upcycle.compat.nemo_strategy import hook_strategy
    from nemo_upcycle.training.callbacks import CheckpointMessages

    par, tr = cfg.parallel, cfg.trainer
    launch = read_launch_env()
    nodes = max(1, launch.world_size // max(1, int(_local_world_size())))
    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        pipeline_dtype=torch.bfloat16 if trains_in_bf16(cfg) else torch.float32,
        ddp=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=gpu_available(),
            use_distributed_optimizer=tr.distributed_optimizer,
            check_for_nan_in_grad=True,
        ),
        ckpt_async_save=gpu_available(),
        ckpt_parallel_save=True,
        # For the optimizer's states (fitted to this layout: optimizer_state.py); model weights
        # are mapped to the checkpoint's names and checked strictly first (compat/nemo_strategy.py).
        ckpt_load_strictness="log_all",
        # The distributed optimizer's state in model space (like the plain optimizer's), so its
        # checkpoints resume at any TP/PP/EP/DP layout; NeMo's default ("dp_reshardable", flat
        # per-bucket shards) only at the saved model-parallel layout. The save gathers each
        # model-parallel shard's state over its data-parallel group first.
        ckpt_optim_fully_reshardable=tr.distributed_optimizer,
    )
    # No megatron timers (a NeMo 2.7.3 deadlock), optimizer states fitted to this layout and model
    # weights loaded strictly on resume: hooks into NeMo's internals, in nemo_upcycle/compat/.
    hook_strategy(strategy)
    checkpoint = None if tr.checkpoint_every_n_steps == 0 else nl.ModelCheckpoint(
        every_n_train_steps=tr.checkpoint_every_n_steps,
        # Only "<name>-last" is kept (what AutoResume resumes from): with Adam's states an
        # E8T2 SmolLM2 checkpoint is 8.4 GB, and a top-k copy beside it doubles that.
        save_last=True,
        save_top_k=0,
        monitor="reduced_train_loss",
        filename="{reduced_train_loss:.2f}-{step}-{consumed_samples}",
        save_optim_on_train_end=True,
    )
    # The plugin writes its params_dtype into the model's config before the model is built (its
    # default is float32: the model would be built and upcycled in fp32, then cast to bf16 by
    # Float16Module). Stated here, the parameters are bf16 from the start, as NeMo's own
    # bf16_mixed recipe builds them, and bf16 checkpoint bytes go straight into them.
    precision = nl.MegatronMixedPrecision(precision="bf16-mixed", params_dtype=torch.bfloat16,
                                          pipeline_dtype=torch.bfloat16) if trains_in_bf16(cfg) else None
    trainer = nl.Trainer(
        accelerator="gpu" if gpu_available() else "cpu",
        devices=int(_local_world_size()),
        num_nodes=nodes,
        strategy=strategy,
        plugins=precision,
        max_steps=tr.max_steps,
        val_check_interval=tr.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=tr.limit_val_batches,
        log_every_n_steps=tr.log_every_n_steps,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[c for c in (checkpoint, *callbacks) if c is not None],
        enable_checkpointing=checkpoint is not None,
        # NeMo swaps Lightning's progress bar for its ProgressPrinter ("Training epoch 0,
        # iteration ..."), a second step line beside the project's: kept for verbose=true only.
        enable_progress_bar=bool(cfg.verbose),
    )
    logger = nl.NeMoLogger(
        log_dir=str(cfg.log_dir), name=RUN_NAME, use_datetime_version=False, version=None,
        ckpt=checkpoint, update_logger_directory=False,
        tensorboard=_tensorboard(cfg),
        wandb=_wandb(cfg),
        extra_loggers=[] if checkpoint is None else [CheckpointMessages()],
    )
    return trainer, logger


def precision_line(cfg: Any) -> str:
    """The training log's statement of the dtype that runs (the console shows it once)."""
    from nemo_upcycle.platform.device import describe

    dtype = params_dtype_for(cfg)
    how = "fp32 master weights, Adam states and gradient reduction" if trains_in_bf16(cfg) else "fp32 throughout"
    return f"parameters in {describe(dtype)} (trainer.precision={cfg.trainer.precision}; {how})"


def _local_world_size() -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))


def _tensorboard(cfg: Any):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(Path(cfg.log_dir)), name="tensorboard", version="")


def _wandb(cfg: Any):
    """``logger.wandb=true``: Weights & Biases beside TensorBoard (every metric the callbacks
    log reaches both), its run files in ``${log_dir}/wandb``, the job configuration as the run's
    config. WANDB_MODE=offline (or ``wandb offline``) keeps it on disk for a later ``wandb sync``."""
    if not cfg.logger.wandb:
        return None
    from lightning.pytorch.loggers import WandbLogger
    from omegaconf import OmegaConf

    import wandb

    if not cfg.verbose:
        # Its banner, warnings and summary are library chatter (on the console with verbose=true);
        # set up before the run starts, or the warnings of its own argument checks get through.
        wandb.setup(settings=wandb.Settings(silent=True))
    log_dir = Path(cfg.log_dir)
    return WandbLogger(name=cfg.logger.wandb_name or log_dir.absolute().name, project=cfg.logger.wandb_project,
                       entity=cfg.logger.wandb_entity, save_dir=str(log_dir),
                       config=OmegaConf.to_container(cfg, resolve=True))


def _finish_wandb(cfg: Any) -> None:
    """Close the W&B run (rank 0's; a no-op elsewhere): the job leaves through ``os._exit``,
    which skips wandb's own exit hook, and an unfinished run loses its last records."""
    if cfg.logger.wandb:
        import wandb

        wandb.finish()


def build_optimizer(cfg: Any):
    import nemo.lightning as nl
    from megatron.core.optimizer import OptimizerConfig
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

    tr = cfg.trainer
    opt = OptimizerConfig(
        optimizer="adam",
        lr=tr.lr,
        min_lr=tr.min_lr,
        weight_decay=tr.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=tr.clip_grad,
        bf16=trains_in_bf16(cfg),
        use_distributed_optimizer=tr.distributed_optimizer,
    )
    sched = CosineAnnealingScheduler(
        max_steps=tr.max_steps, warmup_steps=tr.warmup_steps, constant_steps=0, min_lr=tr.min_lr
    )
    return nl.MegatronOptimizerModule(config=opt, lr_scheduler=sched)


def build_data(cfg: Any, tokenizer, paths: list):
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    tr = cfg.trainer
    return PreTrainingDataModule(
        paths=paths,
        seq_length=tr.seq_length,
        tokenizer=tokenizer,
        micro_batch_size=tr.micro_batch_size,
        global_batch_size=tr.global_batch_size,
        num_workers=0,
        pin_memory=gpu_available(),
        seed=cfg.seed,
        split=cfg.data.split,
        create_attention_mask=not gpu_available(),
        index_mapping_dir=str(Path(cfg.cache_dir) / "index_mappings"),
    )


def run_training(cfg: Any) -> dict:
    """Upcycle (first launch) or resume, then train. Returns a summary on every rank."""
    import nemo.utils  # noqa: F401  (NeMo's logger and its console handlers exist from here)

    from nemo_upcycle.platform.console import adopt_library_handlers

    adopt_library_handlers()  # before importing the rest of NeMo, which logs while it loads
    from nemo.collections import llm
    from nemo.lightning import AutoResume

    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder, tokenizer_only_folder
    from nemo_upcycle.data.prepare import resolve_data_paths
    from nemo_upcycle.training.callbacks import UpcycleMetrics
    from nemo_upcycle.training.guards import TrainingGuards
    from nemo_upcycle.training.preemption import PreemptionStop
    from nemo_upcycle.compat.nemo_cpu import enable_nemo_cpu_support
    from nemo_upcycle.training.model_config import make_gpt_config
    from nemo_upcycle.training.optimizer_state import check_optimizer_matches_checkpoint
    from nemo_upcycle.planner.flops import flops_per_token

    enable_nemo_cpu_support()
    resume_from = resumable_checkpoint(cfg)
    if resume_from is None:
        source = open_dense_source(cfg)  # checks the dense checkpoint before any weight is read
        upcycle_from = str(source.path)
        log.info("no MoE checkpoint in %s: upcycling online from %s", checkpoint_dir(cfg), upcycle_from)
    else:
        upcycle_from = None
        check_optimizer_matches_checkpoint(cfg, resume_from)  # before anything is built
        log.info("resuming from %s (no upcycling)", resume_from)
    log.info("%s", precision_line(cfg))
    tokenizer_path = tokenizer_folder(cfg)  # an embedded model is imported first
    # NeMo copies the tokenizer folder into every checkpoint: give it the tokenizer files only,
    # not an HF model folder's weights beside them.
    tokenizer = _tokenizer(tokenizer_path and tokenizer_only_folder(tokenizer_path, Path(cfg.cache_dir)))
    data = build_data(cfg, tokenizer, resolve_data_paths(cfg, tokenizer_path))

    model = llm.GPTModel(make_gpt_config(cfg, upcycle_from), optim=build_optimizer(cfg), tokenizer=tokenizer)
    metrics = UpcycleMetrics(cfg, Path(cfg.log_dir), flops_per_token(cfg, cfg.trainer.seq_length).training)
    # Guards reuse the metrics' router stats; the preemption stop acts last, on a logged step.
    trainer, logger = build_trainer(cfg, [metrics, TrainingGuards(cfg, metrics), PreemptionStop()])
    resume = AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True,
                        resume_from_directory=str(checkpoint_dir(cfg)))
    try:
        llm.train(model=model, data=data, trainer=trainer, log=logger, resume=resume, tokenizer=None)
        return _after_training(cfg, model, trainer, metrics, tokenizer_path, resume_from, upcycle_from)
    finally:
        _finish_wandb(cfg)


def _after_training(cfg: Any, model, trainer, metrics, tokenizer_path, resume_from, upcycle_from) -> dict:
    """The summary of a finished run, scored on MMLU and perplexity with eval.after_training."""
    summary = {"resumed_from": str(resume_from) if resume_from else None, "upcycled": upcycle_from is not None,
               "steps": trainer.global_step, "loss": metrics.last_record.get("loss"),
               "checkpoint": resumable_checkpoint(cfg) if trainer.checkpoint_callback is not None else None,
               "wandb": str(Path(cfg.log_dir) / "wandb") if cfg.logger.wandb else None}
    if cfg.eval.after_training:
        from nemo_upcycle.evaluation.after_training import evaluate_trained_model

        result = evaluate_trained_model(cfg, model, tokenizer_path, trainer.loggers, trainer.global_step)
        summary.update({k: result["summary"][k] for k in ("mmlu_acc", "ppl") if k in result["summary"]})
    return summary


def finished_line(summary: dict, log_file) -> str:
    """The job's last line: what was trained, the final loss, the checkpoint and the logs."""
    how = (f"resumed from {summary['resumed_from']}" if summary.get("resumed_from")
           else "first launch: upcycled" if summary.get("upcycled") else "")
    parts = [f"{summary.get('steps', '?')} steps" + (f" ({how})" if how else "")]
    if summary.get("loss") is not None:
        parts.append(f"final loss {summary['loss']:.4f}")
    for key, label in (("mmlu_acc", "MMLU acc {:.4f}"), ("ppl", "held-out ppl {:.3f}")):
        if summary.get(key) is not None:
            parts.append(label.format(summary[key]))
    if summary.get("checkpoint"):
        parts.append(f"checkpoint {summary['checkpoint']}")
    if summary.get("wandb"):
        parts.append(f"W&B run files {summary['wandb']}")
    if log_file is not None:
        parts.append(f"library logs {log_file.parent}/rank*.log")
    return "training finished: " + ", ".join(parts)
