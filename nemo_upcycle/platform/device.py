"""Where the project's tensors live: the one home for devices.

Every tensor that meets the model's is placed by one of these functions, so the same
code runs on a CPU with gloo (where all of them answer "cpu" and nothing moves: results are
bit-identical to plain host code) and on a GPU with NCCL:

* :func:`compute_device`: where the model runs (the current CUDA device when CUDA is in use);
  token batches, logits and everything compared with them live there.
* :func:`collective_device`: where a collective's tensors must be for *that* process group's
  backend (NCCL: the CUDA device; gloo: the host), so statistics reduced over the training
  job's gloo side group stay on the host while verify's reductions over NCCL go to the GPU.
* :func:`host_buffer` / :func:`file_bytes_into`: checkpoint bytes land in host memory (pinned
  where they go on to a GPU parameter whole, so that copy is one DMA) and are then copied into
  the parameter; only a host parameter is read into directly (no ``.numpy()`` on a CUDA tensor).
* :func:`like`: host-drawn values (seeded CPU generators: the same numbers on every machine)
  onto the device and dtype of the tensor they are added to.
* :func:`to_host`: results that leave the model (scores, statistics) back on the host.
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Optional

import torch


def gpu_available() -> bool:
    """Whether this process runs on a GPU (CUDA); else everything is on the CPU (gloo, and the
    CPU support of nemo_upcycle/compat/)."""
    return torch.cuda.is_available()


def compute_device() -> torch.device:
    """The device the model's parameters are on: this process's CUDA device, else the CPU."""
    if gpu_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """The device tensors must be on for a collective over ``group`` (default: the world)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_compute(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the compute device (itself when it is there already)."""
    return tensor.to(compute_device())


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in host memory (itself when it is there already)."""
    return tensor.cpu()


def like(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Host-made ``values`` on ``target``'s device, in its dtype (itself when both match)."""
    return values.to(device=target.device, dtype=target.dtype)


def host_buffer(shape, dtype: torch.dtype, staging_for_gpu: bool = False) -> torch.Tensor:
    """An uninitialised host tensor that file bytes are read into. ``staging_for_gpu``: the
    bytes go straight on to a GPU tensor as they are, so the buffer is page-locked (one DMA
    instead of a staged copy). Only then: torch caches freed pinned blocks for the life of the
    process, and a buffer that is sliced (a chunk) or stays on the host gains nothing from it."""
    return torch.empty(shape, dtype=dtype, pin_memory=staging_for_gpu and gpu_available())


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The writable bytes of a contiguous host tensor (for ``readinto``)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        # reshape(-1) of a non-contiguous tensor would be a copy: the bytes would land in a temporary.
        raise ValueError(f"host_bytes needs a contiguous host tensor, got one on {tensor.device} "
                         f"(contiguous: {tensor.is_contiguous()})")
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def file_bytes_into(readinto: Callable[[memoryview], None], dst: torch.Tensor) -> None:
    """Fill contiguous ``dst`` with raw bytes: ``readinto(view)`` must fill all of ``view``.

    A host ``dst`` is read into directly (no temporary memory); any other ``dst`` gets the
    bytes through a host buffer and one copy.
    """
    if dst.device.type == "cpu":
        readinto(host_bytes(dst))
        return
    staging = host_buffer(dst.shape, dst.dtype, staging_for_gpu=True)
    readinto(host_bytes(staging))
    dst.copy_(staging)


def read_exactly(handle: BinaryIO, view: memoryview, on_short: Callable[[], Exception]) -> None:
    """Fill ``view`` from ``handle`` (several ``readinto`` calls if the OS returns less);
    raise ``on_short()`` if the file ends first."""
    got = 0
    while got < len(view):
        n = handle.readinto(view[got:])
        if not n:
            raise on_short()
        got += n


def describe(dtype: torch.dtype, device: Optional[torch.device] = None) -> str:
    """``bfloat16 on cpu``: how a run names the dtype and device it computed in."""
    return f"{str(dtype).removeprefix('torch.')} on {(device or compute_device()).type}"
