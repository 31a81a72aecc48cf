"""Where one training step's time goes: forward time per block and the profiler's op totals.

Run on every rank by ``benchmarks/train_throughput.py`` (through ``run_on_ranks``) for the
dense and the upcycled model at the same layout and batch. It builds the model chunk with
megatron-core directly (the same ``build_model_chunks`` NeMo's trainer uses), runs a few
warm forward+backward passes through megatron's schedule, then measures:

* forward wall time per block, from module hooks: attention, the dense MLP, and for MoE
  layers the router, the experts, and the rest of the MoE layer (token permutation,
  all-to-all dispatch and combine, unpermutation);
* forward+backward wall and CPU seconds (CPU seconds leave out waiting for the other rank in
  collectives), and one Adam step over the rank's parameters;
* ``torch.profiler`` self-CPU time of forward+backward grouped by operator, plus every
  matrix multiplication's count and mean number of rows (the GEMM sizes the cores see).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


class BlockTimer:
    """Forward wall time of chosen modules (CPU execution is synchronous, so hooks time it)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: dict[int, float] = {}
        self._handles = []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def pre(mod, args):
            self._open[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.seconds[name] += time.perf_counter() - self._open.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _watch_blocks(chunk, timer: BlockTimer) -> None:
    for layer in chunk.decoder.layers:
        timer.watch("attention", layer.self_attention)
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            timer.watch("moe_layer_total", mlp)
            timer.watch("router", mlp.router)
            timer.watch("experts", mlp.experts)
        else:
            timer.watch("dense_mlp", mlp)
    if getattr(chunk, "output_layer", None) is not None:
        timer.watch("output_layer", chunk.output_layer)


def profile_step(overrides: list[str], micro_batch: int, seq: int, micro_batches: int,
                 warm: int = 2, measured: int = 3) -> dict:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.platform.distributed import setup_parallel, teardown_parallel

    cfg = compose_config(overrides)
    setup_parallel(cfg.parallel, cfg.seed, timeout_s=900)
    chunks = build_model_chunks(cfg)
    for c in chunks:
        c.train()
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch * micro_batches, seq), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)

    def step():
        for c in chunks:
            c.zero_grad(set_to_none=True)
        run_schedule(chunks, tokens, labels, micro_batch_size=micro_batch, forward_only=False)

    for _ in range(warm):
        step()
    dist.barrier()
    started, started_cpu = time.perf_counter(), time.process_time()
    for _ in range(measured):
        step()
    step_seconds = (time.perf_counter() - started) / measured
    step_cpu = (time.process_time() - started_cpu) / measured

    # The optimizer step NeMo adds (megatron's optimizer wraps torch's Adam on CPU): its cost
    # grows with the parameters a rank holds, which upcycling multiplies, not with FLOPs.
    params = [p for c in chunks for p in c.parameters()]
    adam = torch.optim.Adam(params, lr=1e-5)
    adam.step()
    t = time.perf_counter()
    for _ in range(2):
        adam.step()
    adam_seconds = (time.perf_counter() - t) / 2
    del adam

    timer = BlockTimer()
    for c in chunks:
        _watch_blocks(c, timer)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    timer.remove()

    ops = {}
    gemm = {"calls": 0, "rows": 0, "self_s": 0.0}
    for evt in prof.key_averages(group_by_input_shape=True):
        entry = ops.setdefault(evt.key, {"calls": 0, "self_s": 0.0})
        entry["calls"] += evt.count
        entry["self_s"] += evt.self_cpu_time_total / 1e6
        if evt.key in GEMM_OPS and evt.input_shapes:
            shape = evt.input_shapes[1] if evt.key in ("aten::addmm", "aten::baddbmm") else evt.input_shapes[0]
            if shape:
                gemm["calls"] += evt.count
                gemm["rows"] += evt.count * (shape[-2] if len(shape) >= 2 else 1)
                gemm["self_s"] += evt.self_cpu_time_total / 1e6
    top = sorted(ops.items(), key=lambda kv: -kv[1]["self_s"])[:15]
    blocks = dict(timer.seconds)
    if "moe_layer_total" in blocks:
        blocks["moe_dispatch_combine"] = blocks["moe_layer_total"] - blocks.get("router", 0) - blocks.get("experts", 0)
    result = {
        "rank": dist.get_rank(),
        "forward_backward_s": round(step_seconds, 4),
        "forward_backward_cpu_s": round(step_cpu, 4),
        "adam_step_s": round(adam_seconds, 4),
        "params_on_rank": sum(p.numel() for p in params),
        "profiled_total_self_s": round(sum(v["self_s"] for v in ops.values()), 4),
        "forward_blocks_s": {k: round(v, 4) for k, v in blocks.items()},
        "gemm": {"calls": gemm["calls"], "mean_rows": round(gemm["rows"] / max(1, gemm["calls"]), 1),
                 "self_s": round(gemm["self_s"], 4)},
        "top_ops": [{"op": k, "calls": v["calls"], "self_s": round(v["self_s"], 4)} for k, v in top],
    }
    teardown_parallel()
    return result
