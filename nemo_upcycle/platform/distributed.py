"""Process-group and megatron parallel-state setup for torchrun, Slurm and single runs."""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from nemo_upcycle.compat.cpu import enable_cpu_support
from nemo_upcycle.platform.device import gpu_available
from nemo_upcycle.platform.launcher_env import LaunchEnv, export_torch_env, read_launch_env


def backend_for_this_machine() -> str:
    """NCCL where there is a GPU, gloo on CPU."""
    return "nccl" if gpu_available() else "gloo"


def init_process_group(timeout_s: float = 600.0) -> LaunchEnv:
    """Initialise torch.distributed from torchrun/Slurm variables (idempotent)."""
    launch = read_launch_env()
    export_torch_env(launch)
    enable_cpu_support()
    if not dist.is_initialized():
        if gpu_available():
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(
            backend=backend_for_this_machine(),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return launch


def init_megatron_parallel(parallel: Any, seed: int) -> None:
    """Create megatron's TP/PP/VPP/EP/ETP/CP groups for ``parallel`` (a ParallelConfig)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )
    model_parallel_cuda_manual_seed(seed)


def setup_parallel(parallel: Any, seed: int, timeout_s: float = 600.0) -> LaunchEnv:
    launch = init_process_group(timeout_s)
    init_megatron_parallel(parallel, seed)
    return launch


def teardown_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
