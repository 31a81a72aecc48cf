"""Compute budget: step time and GPU-hours at an assumed MFU, against pre-training compute.

GPU figures are the vendors' dense (no sparsity) bf16 tensor-core peaks and the memory of one
GPU; ``plan.peak_tflops`` / ``plan.gpu_memory_gib`` override them for anything not listed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from nemo_upcycle.config.validate import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float
    memory_gib: float
    # What torch.cuda.get_device_name() reports for this GPU, matched whole (see
    # gpu_for_device_name); empty where no reported name is known.
    device_names: tuple[str, ...] = ()


# Dense bf16 tensor-core peaks from NVIDIA's product pages, which list them "with sparsity"
# (twice the dense figure): https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM 1,979,
# H100 NVL 1,671, H100 PCIe 1,513 TFLOPS), .../data-center/h200/ (1,979), .../data-center/a100/
# (312 dense, SXM and PCIe alike). The H100 whitepaper lists the SXM5 dense peak as 989.4.
GPUS = {
    g.name: g
    for g in (
        GPU("h100", 989.4, 80.0, ("NVIDIA H100 80GB HBM3",)),  # H100 SXM5 80GB
        GPU("h100_pcie", 756.0, 80.0, ("NVIDIA H100 PCIe",)),
        GPU("h100_nvl", 835.0, 94.0, ("NVIDIA H100 NVL",)),
        GPU("h200", 989.4, 141.0, ("NVIDIA H200",)),  # H200 SXM 141GB: H100's compute, more HBM
        GPU("a100", 312.0, 80.0, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")),
        GPU("a100_40gb", 312.0, 40.0, ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB")),
        GPU("b200", 2250.0, 180.0),  # DGX B200: 180 GB per GPU
        GPU("gb200", 2500.0, 186.0),
        GPU("l40s", 362.0, 48.0),
    )
}


def gpu_for_device_name(device_name: str) -> Optional[GPU]:
    """The table's GPU that torch reports as ``device_name``, or None.

    The whole name must match (case and spacing aside): the H100 SXM, PCIe and NVL share the
    chip's name but not its peak (989.4, 756, 835 TFLOP/s), so a substring such as "H100"
    would pick one of them by accident. A name not listed gets no peak rather than a guess.
    """
    wanted = " ".join(device_name.split()).lower()
    for gpu in GPUS.values():
        if wanted in (name.lower() for name in gpu.device_names):
            return gpu
    return None


def gpu_for(plan: Any) -> GPU:
    """The GPU named by ``plan.gpu``, with ``plan.peak_tflops``/``gpu_memory_gib`` applied."""
    known = GPUS.get(str(plan.gpu).lower())
    if known is None and (plan.peak_tflops is None or plan.gpu_memory_gib is None):
        raise ConfigError(
            [f"plan.gpu={plan.gpu} is not one of {sorted(GPUS)}; pick one or give both "
             "plan.peak_tflops and plan.gpu_memory_gib"]
        )
    return GPU(
        name=str(plan.gpu),
        bf16_tflops=plan.peak_tflops if plan.peak_tflops is not None else known.bf16_tflops,
        memory_gib=plan.gpu_memory_gib if plan.gpu_memory_gib is not None else known.memory_gib,
    )


@dataclass
class Budget:
    tokens: float
    tokens_per_step: int
    steps: float
    flops_per_token: float  # training (3x forward)
    total_flops: float
    step_time_s: float
    wall_clock_hours: float
    gpu_hours: float
    pretrain_tokens: float
    pretrain_flops: Optional[float]
    fraction_of_pretraining: Optional[float]

    def as_dict(self) -> dict:
        return asdict(self)


def compute_budget(
    tokens: float, tokens_per_step: int, train_flops_per_token: float,
    dense_train_flops_per_token: float, pretrain_tokens: float,
    world_size: int, peak_tflops: float, mfu: float,
) -> Budget:
    """MFU = model FLOPs / (time * GPUs * peak), so time = FLOPs / (GPUs * peak * MFU).

    The pre-training reference uses the dense model's FLOPs per token at the same sequence
    length times ``model.pretrain_tokens`` (e.g. 15T for Llama 3).
    """
    per_gpu = peak_tflops * 1e12 * mfu
    total = tokens * train_flops_per_token
    step_time = tokens_per_step * train_flops_per_token / (world_size * per_gpu)
    pretrain = pretrain_tokens * dense_train_flops_per_token if pretrain_tokens > 0 else None
    return Budget(
        tokens=tokens,
        tokens_per_step=tokens_per_step,
        steps=tokens / tokens_per_step,
        flops_per_token=train_flops_per_token,
        total_flops=total,
        step_time_s=step_time,
        wall_clock_hours=total / (world_size * per_gpu) / 3600,
        gpu_hours=total / per_gpu / 3600,
        pretrain_tokens=pretrain_tokens,
        pretrain_flops=pretrain,
        fraction_of_pretraining=total / pretrain if pretrain else None,
    )
