"""NeMo 2.7.3's trainer on a CPU-only torch: the few places NeMo itself assumes CUDA.

Enabled together with :func:`nemo_upcycle.compat.cpu.enable_cpu_support`, only when no
GPU is present. megatron-core's own CUDA assumptions are handled there; these are NeMo's,
and (3) megatron-core's distributed optimizer without TE/apex, which only a CPU run meets.
Written for NeMo 2.7.3 and megatron-core 0.15.3 (``compat/versions.py``, checked before
anything is patched):

1. ``megatron_init._set_random_seed`` seeds megatron's model-parallel RNG tracker only
   when CUDA devices exist; without it, building the model fails ("rng state
   model-parallel-rng is not added"). The CPU tracker is seeded instead.
2. ``io.pl._fix_tensors_device`` asserts ``torch.cuda.is_initialized()`` when loading a
   checkpoint (resume); on the CPU the tensors are already where they belong.
3. megatron-core 0.15.3's distributed optimizer checkpointing assumes TE's or apex's
   FusedAdam, which keep Adam's ``step`` in the param groups. Without them (always on the
   CPU) it wraps ``torch.optim.AdamW``, which keeps a 0-dim ``step`` tensor in every
   parameter's state, and (see :func:`_patch_distributed_optimizer_for_torch_adam`):
   saving fails (``distrib_optimizer.py:1646`` asserts each state is a flat shard:
   ``AssertionError: (torch.Size([]), 0, 512)``), loading copies a ``step`` the loaded
   state does not hold (``:928``, KeyError), outside ``no_grad``, into fp32 main params that
   are views of leaves requiring grad (``:417``; RuntimeError),
   ``state_dict`` fails before the first step (``:638``), and a load gives every parameter
   one shared ``step`` tensor (``:821``), which AdamW then increments once per parameter:
   wrong bias correction after a resume, silently.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from nemo_upcycle.compat.cpu import enable_cpu_support
from nemo_upcycle.compat.versions import require

_DONE = False


def enable_nemo_cpu_support() -> bool:
    global _DONE
    if not enable_cpu_support():
        return False
    if _DONE:
        return True
    require("nemo_cpu")
    from megatron.core import tensor_parallel
    from megatron.core.parallel_state import get_pipeline_model_parallel_rank
    from nemo.lightning import megatron_init
    from nemo.lightning.io import pl as io_pl

    def _set_random_seed(seed_):
        if seed_ is None or seed_ <= 0:
            raise ValueError(f"Seed ({seed_}) should be a positive integer.")
        seed = seed_ + 100 * get_pipeline_model_parallel_rank()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    megatron_init._set_random_seed = _set_random_seed
    io_pl._fix_tensors_device = lambda ckpt: ckpt
    _patch_distributed_optimizer_for_torch_adam()
    _DONE = True
    return True


def _patch_distributed_optimizer_for_torch_adam() -> None:
    """Item 3: the distributed optimizer's checkpoint paths with ``torch.optim.AdamW``.

    megatron already stores the step once, in the param groups (``state_dict``, ``:670``),
    and restores it into every parameter's state on load (``load_state_dict``, ``:815``):
    the per-parameter ``step`` is kept out of the sharded tensors, as megatron's other
    formats do (``:1478``, ``:1715``), and each parameter gets its own copy back.
    """
    from megatron.core.optimizer import distrib_optimizer as do

    if do.HAVE_APEX_OR_TE:  # FusedAdam keeps the step in its param groups: nothing to fix
        return
    cls = do.DistributedOptimizer
    get_states, set_states = cls._get_main_param_and_optimizer_states, cls._set_main_param_and_optimizer_states
    state_dict, load_state_dict = cls.state_dict, cls.load_state_dict

    def _get_main_param_and_optimizer_states(self, model_param):
        tensors = get_states(self, model_param)
        tensors.pop("step", None)
        return tensors

    @torch.no_grad()
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key in dst:
            if key != "step":  # megatron sets it from the param groups
                dst[key].copy_(tensors[key])

    def _state_dict(self):
        if len(self.optimizer.state) == 0:  # before the first step (a resume's load template)
            self.optimizer.state.update({p: {"step": torch.tensor(0.0)}
                                         for g in self.optimizer.param_groups for p in g["params"]})
            try:
                return state_dict(self)
            finally:
                self.optimizer.state.clear()
        return state_dict(self)

    def _load_state_dict(self, sd):
        load_state_dict(self, sd)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()

    cls._get_main_param_and_optimizer_states = _get_main_param_and_optimizer_states
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.state_dict = _state_dict
    cls.load_state_dict = _load_state_dict
