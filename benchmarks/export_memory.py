"""Peak memory (max RSS) of ``export_hf`` streaming MoE checkpoints, against the largest tensor.

    python benchmarks/export_memory.py [--workdir DIR] [--keep]

Cases, each export in a fresh process (``/usr/bin/time -v``, as benchmarks/checkpoint_memory.py):
* ``baseline``: the export's libraries imported and the meta-device template built, nothing read;
* a checkpoint **trained by NeMo** (``python -m nemo_upcycle.train``, 2 gloo ranks, EP2, 2 steps,
  AdamW states saved in it): SmolLM2's shape with 8 of its 30 layers, upcycled to E8T2;
  exported with ``checkpoint=<log_dir>`` and nothing else (its stored configuration);
* the generated 233M Llama (benchmarks/generated_llama.py) upcycled to E8T2 (1.1 B parameters,
  4.46 GB in fp32) as an MoE ``torch_dist`` checkpoint, exported back to Mixtral. Training
  that model here is out of reach: AdamW's fp32 states of 1.1 B parameters (about 18 GB beside
  two ranks' libraries) do not fit this 24 GB machine, and the export reads the same
  ``torch_dist`` weights either way (the optimizer states of a trained checkpoint are not read).

Prints a table (peak above the baseline against the largest tensor) and writes
benchmarks/results/export_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.checkpoint_memory import folder_bytes, largest_tensor_bytes, measure  # noqa: E402
from benchmarks.generated_llama import ensure, model_overrides  # noqa: E402
from benchmarks.train_throughput import train  # noqa: E402
from nemo_upcycle.platform.launcher_env import standalone_env  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "export_memory.json"
BASELINE = (
    "import torch, transformers, safetensors, megatron.core.dist_checkpointing\n"
    "import nemo_upcycle.export_hf\n"
    "from nemo_upcycle.checkpoint.convert.dist_writer import meta_model_template\n"
    "meta_model_template({overrides!r})\n"
)
TRAIN = ["moe=e8t2", "router=topk_softmax", "parallel.ep=2", "trainer.max_steps=2", "trainer.micro_batch_size=1",
         "trainer.global_batch_size=2", "trainer.seq_length=128", "trainer.warmup_steps=1",
         "trainer.val_check_interval=100000", "trainer.limit_val_batches=0", "trainer.checkpoint_every_n_steps=2",
         "eval.after_training=false"]


def export_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nemo_upcycle.export_hf", *args, "progress=false"]


def trained_case(work: Path, cache_dir: Path) -> tuple[str, Path, Path]:
    """Train SmolLM2's 8-layer shape as E8T2 with NeMo; (case name, run dir, export dir)."""
    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

    shape = "smollm2_shape_8l"
    tokenizer = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    overrides = model_overrides(shape, ensure(shape, cache_dir)) + [f"model.tokenizer={tokenizer}",
                                                                    f"cache_dir={cache_dir}", *TRAIN]
    run = work / "trained_run"
    print(f"training {shape} E8T2 (EP2, 2 ranks, 2 steps) ...", flush=True)
    train(overrides, 2, run, timeout_s=1800)
    return f"{shape} E8T2 trained by NeMo (EP2, AdamW states in it) -> Mixtral", run, work / "trained_hf"


def generated_233m_case(work: Path, cache_dir: Path) -> tuple[str, Path, Path, list[str]]:
    """The 233M Llama upcycled to E8T2 as an MoE torch_dist checkpoint (in-memory export, then
    import); (case name, checkpoint, export dir, model overrides)."""
    import subprocess

    shape = model_overrides("llama_233m", ensure("llama_233m", cache_dir)) + ["moe=e8t2"]
    first, moe = work / "llama233m_e8t2_first", work / "llama233m_e8t2_torch_dist"
    print("upcycling the generated 233M Llama to E8T2 and importing it as an MoE torch_dist ...", flush=True)
    for cmd in (export_cmd(*shape, f"output_dir={first}"),
                [sys.executable, "-m", "nemo_upcycle.import_dense", f"source={first}", f"output_dir={moe}",
                 "progress=false"]):
        subprocess.run(cmd, cwd=REPO, check=True, env=standalone_env(OMP_NUM_THREADS="1"))
    shutil.rmtree(first)
    return "generated llama_233m E8T2 MoE torch_dist -> Mixtral", moe, work / "llama233m_hf", shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--cache-dir", default=os.environ.get("NEMO_UPCYCLE_CACHE",
                                                               str(Path.home() / ".cache" / "nemo_upcycle")))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def row(case: str, source: Path, out: Path, result: dict) -> None:
        largest = largest_tensor_bytes(out)
        rows.append(dict(case=case, checkpoint_bytes=folder_bytes(source), exported_bytes=folder_bytes(out),
                         largest_tensor_bytes=largest, **result))
        print(f"  {case}: peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, {result['wall_s']}s", flush=True)
        shutil.rmtree(out)

    try:
        base = measure([sys.executable, "-c", BASELINE.format(overrides=["model=tiny_llama",
                        "model.dense_checkpoint=none", "model.num_layers=10", "model.hidden_size=1024",
                        "model.ffn_hidden_size=4096", "model.vocab_size=49152", "moe=e8t2"])])
        rows.append(dict(case="baseline (libraries + meta template, nothing read)", checkpoint_bytes=0,
                         exported_bytes=0, largest_tensor_bytes=0, **base))
        case, run, out = trained_case(work, cache_dir)
        row(case, run, out, measure(export_cmd(f"checkpoint={run}", f"output_dir={out}")))
        case, moe, out, shape = generated_233m_case(work, cache_dir)
        row(case, moe, out, measure(export_cmd(*shape, f"checkpoint={moe}", f"output_dir={out}")))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    floor = rows[0]["peak_rss_bytes"]
    print(f"\n{'case':<72} {'ckpt MB':>8} {'largest MB':>10} {'peak MB':>8} {'- baseline':>10} {'/ largest':>9}")
    for r in rows:
        above = r["peak_rss_bytes"] - floor
        r["peak_rss_above_baseline_bytes"] = above
        ratio = above / r["largest_tensor_bytes"] if r["largest_tensor_bytes"] else None
        r["above_baseline_over_largest_tensor"] = round(ratio, 2) if ratio else None
        print(f"{r['case']:<72} {r['checkpoint_bytes'] / 1e6:>8.0f} {r['largest_tensor_bytes'] / 1e6:>10.0f} "
              f"{r['peak_rss_bytes'] / 1e6:>8.0f} {above / 1e6:>10.0f} {ratio if ratio else 0:>9.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "export_memory", "command": "python benchmarks/export_memory.py",
                                   "cpu_threads": 1, "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
