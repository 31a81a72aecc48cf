"""The five ways to get an upcycled (or dense) model into memory, measured on one rank.

Run on every rank by ``benchmarks/upcycle_cost.py`` through
``tests.support.multirank.run_on_ranks`` (one fresh torchrun job per path):

a ``ours``      build the MoE chunk as the product does (no random init: every value is
                written by the fill), then :func:`upcycle_from_dense` (sharded slice reads);
b ``mcore``     megatron-core's ``upcycling_utils.load_and_upcycle_model``: a dense model
                instance loaded with ``dist_checkpointing.load``, then its state-dict
                conversion into the MoE model (used as a library);
c ``naive``     build the MoE chunk, read the *whole* dense checkpoint into memory, then fill
                the chunk from those in-memory tensors;
d ``dense``     build the dense model at the same layout and load it with
                ``dist_checkpointing.load`` (the time floor for reading);
e ``floor``     build the MoE chunk and load nothing (the memory floor: the result itself).

Every path imports everything and joins the process group first; then the baseline RSS is
taken and the kernel's peak-RSS mark is reset, so ``peak_over_baseline`` is what the path
itself costs. Run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the
kernel instead of hiding in glibc's heap.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks import memprobe

PATHS = ("floor", "dense", "ours", "naive", "mcore")


class InMemoryDense:
    """A dense source over tensors already in memory (the naive path's full state dict)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.tensors = tensors

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in self.tensors.items()}

    def read(self, requests):
        from nemo_upcycle.checkpoint.sources.slices import ReadStats, narrow_tensor_by_index

        stats = ReadStats()
        for req in requests:
            src = narrow_tensor_by_index(self.tensors[req.key], req.offsets, req.shape)
            req.target.copy_(src)
            stats.elements_delivered += req.numel
            stats.keys.add(req.key)
        return stats


def _read_everything(source) -> dict[str, torch.Tensor]:
    """Every tensor of the dense checkpoint at full size (what a converter script loads)."""
    from nemo_upcycle.checkpoint.sources.slices import SliceRequest

    full = {key: torch.empty(shape) for key, shape in source.tensor_shapes().items()}
    source.read([SliceRequest(key, (0,) * t.dim(), t) for key, t in full.items()])
    return full


def _mcore_load(chunks: list, path: str) -> None:
    """megatron-core's standard load of a torch_dist checkpoint into a model."""
    from megatron.core import dist_checkpointing

    if len(chunks) == 1:
        chunks[0].load_state_dict(dist_checkpointing.load(chunks[0].sharded_state_dict(), path))
        return
    state = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    loaded = dist_checkpointing.load(state, path)
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded[f"chunk{i}"])


def _first_touch(chunks: list) -> None:
    for c in chunks:
        for p in c.parameters():
            p.data.zero_()


def _param_bytes(chunks: list) -> int:
    return sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())


def measure(path: str, overrides: list[str], dense_path: str) -> dict:
    import torch.distributed as dist

    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.model.modeling import build_model_chunks, build_transformer_config
    from nemo_upcycle.platform.distributed import setup_parallel, teardown_parallel
    from nemo_upcycle.upcycle.engine import upcycle_from_dense
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint
    from megatron.core.transformer.moe import upcycling_utils  # noqa: F401  (import cost before baseline)

    cfg = compose_config(overrides)
    dense_cfg = compose_config(overrides + ["moe=dense", "parallel.ep=1", "parallel.etp=null"])
    setup_parallel(cfg.parallel, cfg.seed, timeout_s=900)
    dist.barrier()

    baseline = memprobe.reset_peak()
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # the model lives in GPU memory there: measure that too, the same way
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated()
    read0 = memprobe.chars_read()
    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds: less blurred than wall time on a shared machine
    extra: dict = {}
    started, started_cpu = time.perf_counter(), time.process_time()

    def timed(name, fn, *args):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        phases[name] = round(time.perf_counter() - t, 3)
        cpu[name] = round(time.process_time() - c, 3)
        return out

    with torch.no_grad():
        if path == "floor":
            moe = timed("build_moe", build_model_chunks, cfg)
            extra["model_param_bytes"] = _param_bytes(moe)
        elif path == "dense":
            dense = timed("build_dense", build_model_chunks, dense_cfg)
            timed("load", _mcore_load, dense, dense_path)
            extra["model_param_bytes"] = _param_bytes(dense)
        elif path == "ours":
            # As the product's provider builds it (nemo/model_config.py): no random init, the
            # fill writes every parameter.
            moe = timed("build_moe", build_model_chunks, cfg, build_transformer_config(cfg, perform_initialization=False))
            # Without init the parameters' pages are untouched; the kernel maps them on first
            # write. Touch them here (the part of construction megatron's init used to do), so
            # "fill" measures reading and copying, comparable to (d)'s load into a built model.
            timed("first_touch", _first_touch, moe)
            report = timed("fill", upcycle_from_dense, moe, cfg, TorchDistCheckpoint(dense_path))
            extra["upcycle_report"] = report.as_dict()
            extra["model_param_bytes"] = _param_bytes(moe)
        elif path == "naive":
            moe = timed("build_moe", build_model_chunks, cfg)
            source = TorchDistCheckpoint(dense_path)
            full = timed("read_full", _read_everything, source)
            timed("fill", upcycle_from_dense, moe, cfg, InMemoryDense(source.path, full))
            del full
            extra["model_param_bytes"] = _param_bytes(moe)
        elif path == "mcore":
            from megatron.core.transformer.moe.upcycling_utils import load_and_upcycle_model

            dense = timed("build_dense", build_model_chunks, dense_cfg)
            moe = timed("build_moe", build_model_chunks, cfg)

            def load_dense():
                timed("load", _mcore_load, dense, dense_path)
                return 0, 0

            t, c = time.perf_counter(), time.process_time()
            load_and_upcycle_model(load_dense, moe, dense)
            phases["convert"] = round(time.perf_counter() - t - phases["load"], 3)
            cpu["convert"] = round(time.process_time() - c - cpu["load"], 3)
            del dense
            extra["model_param_bytes"] = _param_bytes(moe)
        else:
            raise ValueError(f"unknown path {path!r}; one of {PATHS}")

    if on_gpu:
        torch.cuda.synchronize()
        extra["gpu_peak_over_baseline_bytes"] = torch.cuda.max_memory_allocated() - gpu_baseline
    seconds = time.perf_counter() - started
    peak = memprobe.peak_rss_bytes()
    result = dict(
        rank=dist.get_rank(),
        path=path,
        seconds=round(seconds, 3),
        cpu_seconds=round(time.process_time() - started_cpu, 3),
        phases=phases,
        phases_cpu=cpu,
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak,
        peak_over_baseline_bytes=peak - baseline,
        chars_read=memprobe.chars_read() - read0,
        **extra,
    )
    teardown_parallel()
    return result
