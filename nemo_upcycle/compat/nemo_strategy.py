"""The training job's hooks into NeMo 2.7's ``MegatronStrategy``, applied on every machine.

Written for NeMo's 2.7 release line with megatron-core 0.15 (``compat/versions.py``, checked
before anything is hooked): each hook replaces a method of this one strategy object (or of its
checkpoint IO, for the duration of one load) with a wrapper that calls the original, relying on
how NeMo 2.7 calls them.

1. NeMo 2.7.3 bug: its ProgressPrinter gathers megatron's timers across all ranks but is
   called on rank 0 only, so the first logged step deadlocks any multi-rank job whose timers
   recorded something. Without timers megatron records nothing to gather.
2. Resuming at EP1 from EP > 1 (or back): the loaded optimizer state is put in the current
   optimizer's structure first (nemo_upcycle/training/optimizer_state.py).
3. Resuming maps the checkpoint's model-weight names onto the model's and refuses a weight
   missing on either side (nemo_upcycle/checkpoint/strict_load.py).
"""
from __future__ import annotations

from nemo_upcycle.compat.versions import require


def hook_strategy(strategy) -> None:
    """Items 1-3 of the module docstring, on ``strategy`` (a ``nemo.lightning.MegatronStrategy``)."""
    require("nemo_strategy")
    strategy.timers = None
    _fit_optimizer_state_on_load(strategy)
    _load_model_weights_strictly(strategy)


def _load_model_weights_strictly(strategy) -> None:
    """Resume maps the checkpoint's names (either layer spec's) onto the model's and refuses a
    model weight missing on either side (nemo_upcycle.checkpoint.strict_load), where megatron's
    "log_all" would leave it at its initial value. Hooked into the checkpoint IO's load for the
    duration of NeMo's own load, which builds the sharded state dict it is handed."""
    from nemo_upcycle.checkpoint.strict_load import map_names_and_check

    load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path, selective_restore: bool = False):
        checkpoint_io = strategy.checkpoint_io
        io_load = checkpoint_io.load_checkpoint

        def strict_load(path, sharded_state_dict=None, **kwargs):
            map_names_and_check(
                sharded_state_dict, sharded_state_dict["state_dict"], path, f"resuming from {checkpoint_path}",
                "Resume it with the model/moe/router configuration that trained it, or train into a new log_dir.")
            return io_load(path, sharded_state_dict=sharded_state_dict, **kwargs)

        checkpoint_io.load_checkpoint = strict_load
        try:
            return load(checkpoint_path, selective_restore=selective_restore)
        finally:
            del checkpoint_io.load_checkpoint  # the class's method again

    strategy.load_checkpoint = load_checkpoint


def _fit_optimizer_state_on_load(strategy) -> None:
    """Resuming at EP1 from EP > 1 (or back) changes how megatron chains its optimizers: the
    loaded optimizer state is put in the current structure first (see ``optimizer_state``)."""
    from nemo_upcycle.training.optimizer_state import fit_optimizer_state

    load = strategy.load_optimizer_state_dict

    def load_optimizer_state_dict(checkpoint, selective_restore: bool = False):
        if "optimizer" in checkpoint:
            checkpoint["optimizer"] = [fit_optimizer_state(opt.mcore_optimizer, state) if hasattr(opt, "mcore_optimizer")
                                       else state for opt, state in zip(strategy.optimizers, checkpoint["optimizer"])]
        # The LR schedulers (restored next) keep one entry per param group (base_lrs, ...): the
        # current ones, from the same config, where the number of groups changed.
        for config, saved in zip(strategy.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
            current = config.scheduler.state_dict()
            for key, value in saved.items():
                if isinstance(value, list) and isinstance(current.get(key), list) and len(value) != len(current[key]):
                    saved[key] = current[key]
        return load(checkpoint, selective_restore=selective_restore)

    strategy.load_optimizer_state_dict = load_optimizer_state_dict
