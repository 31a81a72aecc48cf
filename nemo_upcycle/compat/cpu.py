"""Make megatron-core (and NeMo's trainer on top of it) run on a CPU-only torch with gloo.

megatron-core assumes CUDA throughout. :func:`enable_cpu_support` is the single, explicit
switch that removes those assumptions; it is called by every entry point and by the tests,
and does nothing when a GPU is present, so GPU behaviour is never changed. Written for
megatron-core 0.15.3 (``compat/versions.py``, checked before anything is patched). Each item
below is one CUDA dependency observed in megatron-core (see README, "megatron-core on CPU"):

1. ``torch.cuda.current_device()`` used as a device      -> returns ``"cpu"``
2. the model-parallel RNG tracker (CUDA generator states) -> a tracker over the CPU generator;
   activation recomputation's save/restore of the CUDA     -> nothing to save
   generator state; its FP8 test that always holds        -> bool(fp8)
3. ``torch.cuda.Stream``/events in the alltoall dispatcher -> no-op stream objects
4. ``moe_utils.te_general_gemm`` undefined without TE      -> defined as ``None``
5. dispatcher split sizes only converted for CUDA tensors -> converted for CPU tensors too
6. the local norm refuses sequence parallelism            -> ``torch.nn.RMSNorm``/``LayerNorm``
                                                              tagged ``sequence_parallel``
7. gloo cannot gather/reduce-scatter unequal sizes         -> pad to the largest, then slice
8. ``device="cuda"`` literals, ``.cuda()``, ``pin_memory``   -> a TorchFunctionMode maps them
                                                              to the CPU
9. ``clip_grads``/distributed optimizer check
   ``tensor.type() == "torch.cuda.FloatTensor"``           -> the same mode reports the CUDA
                                                              type name for CPU tensors
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from nemo_upcycle.compat.versions import require
from nemo_upcycle.platform.device import gpu_available

log = logging.getLogger(__name__)

_ENABLED = False


def enable_cpu_support() -> bool:
    """Install every CPU workaround once. Returns True when they are active.

    Safe to call many times and from every process; a no-op when CUDA is available. Refuses
    (:class:`~nemo_upcycle.compat.versions.VersionMismatch`) another megatron-core than the
    one it was written for, before anything is patched.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if gpu_available():
        return False
    require("cpu")
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_moe_utils()
    _patch_sequence_parallel_norm()
    _patch_uneven_collectives()
    _CudaLiteralsToCpu().__enter__()  # stays active for the life of the process
    _ENABLED = True
    log.info("megatron-core CPU support enabled (gloo backend)")
    return True


# 1, 3: torch.cuda entry points -------------------------------------------------------


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: on the CPU all work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NoOpStream":
        return self

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoOpStream)

    __hash__ = object.__hash__


_CPU_STREAM = _NoOpStream()


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.default_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.reset_peak_memory_stats = lambda device=None: None


# 2: RNG tracker ------------------------------------------------------------------------


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's tracker, holding CPU generator states instead of CUDA ones.

        ``fork`` swaps the CPU generator to the named state and back, which is what the
        CUDA tracker does with the CUDA generator; dropout and initialisation inside
        ``fork`` therefore draw from per-TP/EP-rank streams exactly as on GPU.
        """

        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["use_cudagraphable_rng"] = False
            super().__init__(*args, **kwargs)

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Trackers created before this call (none in a fresh process) are replaced too.
    mp_random._CUDA_RNG_STATE_TRACKER = None
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    # Activation recomputation (trainer.recompute: tensor_parallel.checkpoint) saves the CPU
    # generator, the CUDA generator and the tracker before the forward and restores them before
    # recomputing it: on the CPU there is no CUDA generator to save, the other two suffice.
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    # megatron-core 0.15.3's CheckpointWithoutOutput (selective recomputation of layernorm and
    # moe_act) sets ``self.fp8 = fp8 is not None``, True for its default fp8=False, so it always
    # takes Transformer Engine's FP8 path: a NameError without TE. What it means is bool(fp8).
    checkpoint_init = mp_random.CheckpointWithoutOutput.__init__

    def without_te_fp8(self, fp8=False):
        checkpoint_init(self, fp8)
        self.fp8 = bool(fp8)

    mp_random.CheckpointWithoutOutput.__init__ = without_te_fp8


# 4, 5: MoE utilities -------------------------------------------------------------------


def _patch_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# 6: sequence-parallel norm -------------------------------------------------------------


def _patch_sequence_parallel_norm() -> None:
    """megatron's WrappedTorchNorm asserts ``not sequence_parallel``.

    A torch norm is correct under sequence parallelism as long as its weight gradients
    are all-reduced across TP ranks, which megatron's DDP does for parameters tagged
    ``sequence_parallel = True``; so build the torch norm and tag it.
    """
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[
            config.normalization
        ]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


# 7: uneven all-gather / reduce-scatter on gloo --------------------------------------


def _gather_uneven(input_: torch.Tensor, group, output_split_sizes) -> torch.Tensor:
    largest = max(output_split_sizes)
    padded = input_.new_zeros((largest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((largest * len(output_split_sizes), *input_.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    pieces = [gathered[i * largest : i * largest + n] for i, n in enumerate(output_split_sizes)]
    return torch.cat(pieces, dim=0)


def _reduce_scatter_uneven(input_: torch.Tensor, group, input_split_sizes) -> torch.Tensor:
    largest = max(input_split_sizes)
    rank = dist.get_rank(group)
    chunks = torch.split(input_, input_split_sizes, dim=0)
    padded = input_.new_zeros((largest * len(chunks), *input_.shape[1:]))
    for i, chunk in enumerate(chunks):
        padded[i * largest : i * largest + chunk.shape[0]] = chunk
    output = input_.new_empty((largest, *input_.shape[1:]))
    dist.reduce_scatter_tensor(output, padded, group=group)
    return output[: input_split_sizes[rank]].contiguous()


def _patch_uneven_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or dist.get_world_size(group) == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        return _gather_uneven(input_, group, list(output_split_sizes))

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or dist.get_world_size(group) == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        return _reduce_scatter_uneven(input_, group, list(input_split_sizes))

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


# 8, 9: CUDA literals -------------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites requests for CUDA memory into CPU ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)
