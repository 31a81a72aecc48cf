"""NeMo 2.7.3's trainer on a CPU-only torch: the few places NeMo itself assumes CUDA.

Enabled together with :func:`nemo_upcycle.platform.cpu.enable_cpu_support`, only when no
GPU is present. megatron-core's own CUDA assumptions are handled there; these are NeMo's:

1. ``megatron_init._set_random_seed`` seeds megatron's model-parallel RNG tracker only
   when CUDA devices exist; without it, building the model fails ("rng state
   model-parallel-rng is not added"). The CPU tracker is seeded instead.
2. ``io.pl._fix_tensors_device`` asserts ``torch.cuda.is_initialized()`` when loading a
   checkpoint (resume); on the CPU the tensors are already where they belong.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_DONE = False


def enable_nemo_cpu_support() -> bool:
    global _DONE
    from nemo_upcycle.platform.cpu import enable_cpu_support

    if not enable_cpu_support():
        return False
    if _DONE:
        return True
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
    _DONE = True
    return True
