"""Training throughput of the upcycled E8T2 model against the dense model, same layout and batch.

    python benchmarks/train_throughput.py [--model smollm2_shape_8l|smollm2] [--nproc 2]
        [--steps 8] [--warm 3] [--peak-tflops X]

Both models train with NeMo's trainer (``python -m nemo_upcycle.train`` under torchrun: the
product's own path, online upcycling included) for a few steps on the same ranks, data,
sequence length and global batch; the MoE uses expert parallelism over the ranks, the dense
model data parallelism over the same ranks. Step time, tokens/s and MFU come from the
metrics the training job logs (``metrics.jsonl``, written by ``nemo/callbacks.py``), the
first ``--warm`` steps dropped. The measured MoE/dense step-time ratio is reported beside
the ratio of training FLOPs per token computed from the two configs (planning/flops.py).

MFU = model FLOPs per token x tokens/s / (peak FLOP/s per device x devices). The peak is
the GPU's from the planner's table, or ``--peak-tflops``; on a CPU without an override it is
*measured*: the fp32 matrix-multiply rate of one core (each rank runs one thread), so the
CPU figure says how close the step gets to this machine's own GEMM speed.

A gap larger than 1.5x between the two ratios is explained by measurement: each model's
forward+backward is profiled on the same layout (``benchmarks/step_profile.py``: forward
time per block from module hooks, profiler self time per operator, GEMM count and size).

Default model: SmolLM2-135M's shape (hidden 576, FFN 1536, 9 heads, 3 KV groups, vocab
49152, tied embeddings) with 8 of its 30 layers, random seeded weights generated once into
the cache (``benchmarks/generated_llama.py``), trained on the SmolLM2-tokenized Wikipedia
sample. ``--model smollm2`` uses the real 30-layer SmolLM2 (about 7.6 GB per rank for the
MoE with Adam). Writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import machine  # noqa: E402
from nemo_upcycle.platform.launcher_env import standalone_env  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def model_overrides(model: str, cache_dir: Path, with_tokenizer: bool = True,
                    tokenizer: str | None = None) -> list[str]:
    """Hydra overrides of ``model``; a tokenizer (and data) only when training with NeMo:
    ``tokenizer``, else SmolLM2's (the embedded package's; the GPU script brings its own)."""
    if model == "smollm2":
        return ["model=smollm2_135m"]
    from benchmarks.generated_llama import ensure, model_overrides as shape_overrides

    out = shape_overrides(model, ensure(model, cache_dir))
    if with_tokenizer:
        if tokenizer is None:
            from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

            tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
        out.append(f"model.tokenizer={tokenizer}")
    return out


def measured_cpu_peak_tflops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 GEMM rate of one thread (what one CPU rank can reach at best), in TFLOP/s."""
    code = (
        "import torch, time\n"
        f"n = {size}; a = torch.randn(n, n); b = torch.randn(n, n); a @ b\n"
        "best = 1e9\n"
        f"for _ in range({repeats}):\n"
        "    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)\n"
        "print(2 * n ** 3 / best / 1e12)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=standalone_env(OMP_NUM_THREADS="1"))
    return float(out.stdout.strip().splitlines()[-1])


def train(overrides: list[str], nproc: int, log_dir: Path, timeout_s: float) -> list[dict]:
    """Run the product's training job; its per-step metrics (rank 0's metrics.jsonl)."""
    from nemo_upcycle.util.ports import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--max_restarts=0", "-m", "nemo_upcycle.train",
           *overrides, f"log_dir={log_dir}"]
    env = standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"training did not finish in {timeout_s:.0f}s:\n{out[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{out[-4000:]}")
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarise_steps(records: list[dict], warm: int, tokens_per_step: int) -> dict:
    steady = records[warm:]
    if not steady:
        raise RuntimeError(f"only {len(records)} steps logged; need more than --warm={warm}")
    times = [r["step_time_s"] for r in steady]
    median = statistics.median(times)
    out = {
        "steps_logged": len(records), "warm_steps_dropped": warm,
        "step_time_s_median": round(median, 4), "step_time_s_min": round(min(times), 4),
        "step_time_s_all": [round(r["step_time_s"], 4) for r in records],
        "tokens_per_s": round(tokens_per_step / median, 1),
        "loss_first_last": [records[0].get("loss"), records[-1].get("loss")],
    }
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    if mfus:
        out["mfu_logged_median"] = round(statistics.median(mfus), 4)
    return out


def profile(overrides: list[str], nproc: int, micro_batch: int, seq: int, micro_batches: int,
            warm: int = 2, measured: int = 3, timeout_s: float = 1200) -> list[dict]:
    from tests.support.multirank import run_on_ranks

    # The repository first, then whatever the caller put there (the GPU run's carried wheels).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return run_on_ranks("benchmarks.step_profile:profile_step", nproc, timeout_s=timeout_s,
                        env={"PYTHONPATH": path}, overrides=overrides, micro_batch=micro_batch,
                        seq=seq, micro_batches=micro_batches, warm=warm, measured=measured)


def mcore_steps(prof: list[dict], warm: int, tokens_per_step: int) -> dict:
    """Step figures from the megatron-core loop (forward+backward, then one Adam step), slowest rank."""
    step = max(r["forward_backward_s"] + r["adam_step_s"] for r in prof)
    return {"steps_logged": None, "warm_steps_dropped": warm, "step_time_s_median": round(step, 4),
            "tokens_per_s": round(tokens_per_step / step, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_shape_8l", choices=["smollm2_shape_8l", "smollm2", "tiny_dry", "llama_1b_6l"])
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder for the data (default: SmolLM2's)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak per device; default: GPU table or measured CPU GEMM")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both runs (e.g. the GPU script's)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--backend", default="nemo", choices=["nemo", "mcore"],
                        help="nemo: the product's training job (default); mcore: megatron-core forward+backward "
                             "and an Adam step, no NeMo (seconds to start: the GPU script's dry run)")
    parser.add_argument("--cache-dir", default=os.environ.get("NEMO_UPCYCLE_CACHE", str(Path.home() / ".cache" / "nemo_upcycle")))
    parser.add_argument("--max-wait-min", type=float, default=60.0)
    parser.add_argument("--timeout-min", type=float, default=30.0, help="longest training (or profiling) run")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="everything ends within this many minutes of the start: each wait and run gets at most "
                             "the time left, a run with under 10 s left is skipped (the GPU script's deadline)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_min * 60 if args.budget_min is not None else float("inf")
    os.chdir(REPO)

    import torch

    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.planner.flops import flops_per_token
    from nemo_upcycle.planner.params import rank_params
    from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel

    info = machine.describe()
    cache_dir = Path(args.cache_dir)
    base = model_overrides(args.model, cache_dir, with_tokenizer=args.backend == "nemo", tokenizer=args.tokenizer)
    global_batch = args.micro_batch * args.nproc  # one micro-batch per rank per step
    trainer = [f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={args.micro_batch}",
               f"trainer.global_batch_size={global_batch}", f"trainer.seq_length={args.seq}",
               "trainer.warmup_steps=1", "trainer.val_check_interval=100000", "trainer.limit_val_batches=0",
               "trainer.checkpoint_every_n_steps=0", "trainer.log_every_n_steps=1", "eval.after_training=false"]
    layouts = {"dense": ["moe=dense"], "moe_e8t2": ["moe=e8t2", "router=topk_softmax", f"parallel.ep={args.nproc}"]}

    peak_source = "override"
    peak_tflops = args.peak_tflops
    if peak_tflops is None:
        known = None
        if torch.cuda.is_available():  # (imports Lightning: only where there is a GPU to look up)
            from nemo_upcycle.training.callbacks import peak_flops_per_device

            known = peak_flops_per_device(None)
        if known:
            peak_tflops, peak_source = known / 1e12, f"GPU table ({torch.cuda.get_device_name()})"
        else:
            print("measuring this CPU's one-thread fp32 GEMM rate (the CPU 'peak') ...", flush=True)
            peak_tflops, peak_source = measured_cpu_peak_tflops(), "measured: 1-thread fp32 GEMM, 1024^3, best of 5"
    trainer.append(f"trainer.peak_tflops={peak_tflops}")  # so the job logs MFU itself

    tokens_per_step = global_batch * args.seq
    runs: dict = {}

    def left_s(limit_s: float) -> float:
        return min(limit_s, deadline - time.monotonic())

    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for name, layout in layouts.items():
            # A run that fails (out of memory, a timeout) is recorded and the JSON written after
            # every run: the other run's figures survive it, and a kill from outside.
            try:
                if left_s(args.timeout_min * 60) < 10:
                    runs[name] = {"status": "skipped", "reason": f"no time left of the {args.budget_min} min budget"}
                    continue
                overrides = base + layout + trainer + list(args.extra)
                cfg = compose_config(overrides)
                # fp32 weights, grads and Adam's two moments (16 bytes a parameter) + libraries
                par = cfg.parallel
                params = rank_params(cfg, 0, par.tp, par.ep, expert_tensor_parallel(par)).total
                need = args.nproc * (16 * params + 1.2 * 2**30)
                fits, reason = machine.wait_for_memory(int(need), max_wait_s=max(left_s(args.max_wait_min * 60), 0),
                                                       label=name)
                if not fits:
                    runs[name] = {"status": "skipped", "reason": reason}
                    continue
                timeout_s = left_s(args.timeout_min * 60)
                print(f"== training {name} for {args.steps} steps on {args.nproc} ranks ({args.backend}, "
                      f"limit {timeout_s:.0f}s) ...", flush=True)
                t = time.perf_counter()
                fpt = flops_per_token(cfg, args.seq, dense=(name == "dense")).training
                if args.backend == "nemo":
                    records = train(overrides, args.nproc, Path(tmp) / name, timeout_s)
                    summary = summarise_steps(records, args.warm, tokens_per_step)
                else:
                    prof = profile(base + layout + list(args.extra), args.nproc, args.micro_batch, args.seq, 1,
                                   warm=args.warm, measured=max(1, args.steps - args.warm), timeout_s=left_s(1200))
                    summary = mcore_steps(prof, args.warm, tokens_per_step)
                    summary["profile"] = prof
                summary.update(status="ok", backend=args.backend, overrides=overrides,
                               launch_wall_s=round(time.perf_counter() - t, 1),
                               train_flops_per_token=fpt,
                               mfu=round(fpt * summary["tokens_per_s"] / (peak_tflops * 1e12 * args.nproc), 5))
                runs[name] = summary
                print(f"   median step {summary['step_time_s_median']:.3f}s, {summary['tokens_per_s']:.0f} tok/s, "
                      f"MFU {summary['mfu']:.2%} (logged {summary.get('mfu_logged_median')})", flush=True)
                if not args.no_profile and args.backend == "nemo":
                    print(f"   profiling one forward+backward of {name} ...", flush=True)
                    try:
                        summary["profile"] = profile(base + layout + list(args.extra), args.nproc, args.micro_batch,
                                                     args.seq, 1, timeout_s=left_s(1200))
                    except Exception as err:  # noqa: BLE001 (the measured run stands)
                        summary["profile_error"] = f"{type(err).__name__}: {err}"[-3000:]
            except Exception as err:  # noqa: BLE001 (recorded with the error's tail)
                runs[name] = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[-3000:]}
                print(f"   {name} failed: {runs[name]['reason'][-1500:]}", flush=True)
            finally:
                write_doc(args, runs, info, peak_tflops, peak_source, global_batch, tokens_per_step)

    out = write_doc(args, runs, info, peak_tflops, peak_source, global_batch, tokens_per_step)
    doc = json.loads(out.read_text())
    print(json.dumps({k: doc[k] for k in ("ratio",) if k in doc}, indent=2))
    for name, r in runs.items():
        if r.get("status") == "ok":
            print(f"{name:<9} step {r['step_time_s_median']:.3f}s  {r['tokens_per_s']:.0f} tok/s  "
                  f"FLOPs/token {r['train_flops_per_token'] / 1e9:.3f} G  MFU {r['mfu']:.2%} ({peak_source})")
        else:
            print(f"{name:<9} {r.get('status')}: {r.get('reason', '')[-500:]}")
    print(f"wrote {out}")
    return 1 if any(r.get("status") == "failed" for r in runs.values()) else 0


def write_doc(args, runs: dict, info: dict, peak_tflops: float, peak_source: str, global_batch: int,
              tokens_per_step: int) -> Path:
    """The JSON as it stands (written after each run, so a later failure or kill keeps it)."""
    import torch

    doc = {"benchmark": "train_throughput", "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
           "model": args.model, "nproc": args.nproc, "seq_length": args.seq, "micro_batch_size": args.micro_batch,
           "global_batch_size": global_batch, "tokens_per_step": tokens_per_step,
           "layouts": {"dense": f"data parallel over {args.nproc} ranks",
                       "moe_e8t2": f"expert parallel EP{args.nproc} (attention/embeddings data parallel)"},
           "peak_tflops_per_device": peak_tflops, "peak_source": peak_source, "machine": info, "runs": runs,
           "note": ("the two models were measured one after the other in the same run, "
                    + (f"on one {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                       else "on a CPU-only machine shared with other jobs"))}
    dense, moe = runs.get("dense", {}), runs.get("moe_e8t2", {})
    if dense.get("status") == "ok" and moe.get("status") == "ok":
        measured = moe["step_time_s_median"] / dense["step_time_s_median"]
        flops = moe["train_flops_per_token"] / dense["train_flops_per_token"]
        doc["ratio"] = {"measured_step_time_moe_over_dense": round(measured, 3),
                        "flops_per_token_moe_over_dense": round(flops, 3),
                        "gap_measured_over_flops": round(measured / flops, 3)}
        if "profile" in moe and "profile" in dense:
            doc["ratio"]["profiled_forward_backward_moe_over_dense"] = round(
                max(r["forward_backward_s"] for r in moe["profile"]) /
                max(r["forward_backward_s"] for r in dense["profile"]), 3)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)
    return out


if __name__ == "__main__":
    sys.exit(main())
