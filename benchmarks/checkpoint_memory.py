"""Peak memory (max RSS) of the streaming import and export, each in a fresh process.

    python benchmarks/checkpoint_memory.py [--workdir DIR] [--layers 8] [--keep]

Cases:
* ``baseline``: the same process imports torch, megatron-core, transformers and builds the
  meta-device template, but converts nothing (what the libraries alone cost);
* SmolLM2-135M (the embedded model's float32 HF folder): import to a dense torch_dist;
  the E8T2 upcycle exported to Mixtral (``export_hf`` without a checkpoint: the only path
  that holds the model, since it upcycles in memory); that Mixtral folder imported as an MoE
  torch_dist checkpoint; and that MoE checkpoint exported back to Mixtral (streaming);
* a generated dense Llama-shaped HF folder (random float32, sharded, >= 1.5 GB): import,
  then export of the imported checkpoint.

Peak RSS comes from ``/usr/bin/time -v`` (falls back to psutil polling). Prints a table and
writes benchmarks/results/checkpoint_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nemo_upcycle.platform.launcher_env import standalone_env  # a job of its own, whatever launched this

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "checkpoint_memory.json"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process; its peak RSS (bytes) and wall time."""
    env = standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    if Path("/usr/bin/time").exists():
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, env=env, text=True, capture_output=True)
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(match.group(1)) * 1024 if match else None
    else:  # poll psutil
        import psutil

        proc_handle = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        peak_box = [0]

        def poll():
            p = psutil.Process(proc_handle.pid)
            while proc_handle.poll() is None:
                try:
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    peak_box[0] = max(peak_box[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.05)

        thread = threading.Thread(target=poll)
        thread.start()
        out, err = proc_handle.communicate()
        thread.join()
        proc = subprocess.CompletedProcess(cmd, proc_handle.returncode, out, err)
        peak = peak_box[0]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("imported", "exported", "upcycled"))]
    return {"peak_rss_bytes": peak, "wall_s": round(time.perf_counter() - started, 1), "log": summary}


def generate_llama(folder: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                   shard_bytes: int = 500_000_000) -> int:
    """A random dense Llama HF folder (float32 safetensors shards + index); returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = torch.randn(shape, generator=gen) * 0.02
        size += current[name].numel() * 4
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * 4
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    }))
    return total


def largest_tensor_bytes(folder: Path) -> int:
    from nemo_upcycle.checkpoint.sources.hf_safetensors import HFFolder

    hf = HFFolder(folder)
    return max(4 * _numel(shape) for _, shape, _ in hf.tensors.values())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_overrides(hf: Path) -> list[str]:
    cfg = json.loads((hf / "config.json").read_text())
    return [
        "model=tiny_llama", f"model.num_layers={cfg['num_hidden_layers']}", f"model.hidden_size={cfg['hidden_size']}",
        f"model.ffn_hidden_size={cfg['intermediate_size']}", f"model.num_attention_heads={cfg['num_attention_heads']}",
        f"model.num_query_groups={cfg['num_key_value_heads']}", f"model.vocab_size={cfg['vocab_size']}",
        f"model.rotary_base={cfg['rope_theta']}", f"model.tie_embeddings={str(cfg['tie_word_embeddings']).lower()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--cache-dir", default=os.environ.get("NEMO_UPCYCLE_CACHE", str(Path.home() / ".cache" / "nemo_upcycle")))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ckpt-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []

    def row(case: str, model_bytes: int, largest: int, result: dict, **extra) -> None:
        rows.append(dict(case=case, model_bytes=model_bytes, largest_tensor_bytes=largest, **result, **extra))
        print(f"  {case}: peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, {result['wall_s']}s", flush=True)

    try:
        baseline_code = (
            "import torch, transformers, safetensors, megatron.core.dist_checkpointing\n"
            "import nemo_upcycle.import_dense, nemo_upcycle.export_hf\n"
            "from nemo_upcycle.checkpoint.convert.dist_writer import meta_model_template\n"
            "meta_model_template(['model=smollm2_135m', 'model.dense_checkpoint=none', 'moe=e8t2'])\n"
        )
        row("baseline (libraries + meta template, no weights)", 0, 0, measure([py, "-c", baseline_code]))

        if not args.skip_smollm2:
            from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

            hf = ensure_embedded("embedded:smollm2_135m", args.cache_dir)["hf"]
            dense = work / "smollm2_dense"
            row("smollm2 import HF -> dense torch_dist",
                sum(f.stat().st_size for f in hf.glob("*.safetensors")), largest_tensor_bytes(hf),
                measure([py, "-m", "nemo_upcycle.import_dense", f"source={hf}", f"output_dir={dense}", "progress=false"]))
            mixtral = work / "smollm2_e8t2_hf"
            r = measure([py, "-m", "nemo_upcycle.export_hf", "model=smollm2_135m", f"model.dense_checkpoint={dense}",
                         "moe=e8t2", f"output_dir={mixtral}", "progress=false"])
            row("smollm2 E8T2 upcycle in memory + export -> Mixtral (holds the MoE model)",
                folder_bytes(mixtral), largest_tensor_bytes(mixtral), r)
            moe = work / "smollm2_e8t2_torch_dist"
            row("smollm2 E8T2 import Mixtral -> MoE torch_dist", folder_bytes(mixtral), largest_tensor_bytes(mixtral),
                measure([py, "-m", "nemo_upcycle.import_dense", f"source={mixtral}", f"output_dir={moe}", "progress=false"]))
            again = work / "smollm2_e8t2_hf_again"
            row("smollm2 E8T2 export MoE torch_dist -> Mixtral", folder_bytes(mixtral), largest_tensor_bytes(mixtral),
                measure([py, "-m", "nemo_upcycle.export_hf", "model=smollm2_135m", "moe=e8t2", f"checkpoint={moe}",
                         f"output_dir={again}", "progress=false"]))
            for path in (mixtral, moe, again):
                shutil.rmtree(path, ignore_errors=True)

        big = work / "llama_generated_hf"
        print(f"generating a random Llama ({args.layers} layers) in {big} ...", flush=True)
        total = generate_llama(big, layers=args.layers, hidden=2048, ffn=5632, heads=16, kv_heads=4, vocab=32000)
        largest = largest_tensor_bytes(big)
        ckpt = work / "llama_generated_torch_dist"
        row(f"generated Llama ({total / 1e9:.2f} GB) import HF -> dense torch_dist", total, largest,
            measure([py, "-m", "nemo_upcycle.import_dense", f"source={big}", f"output_dir={ckpt}", "progress=false"]))
        out = work / "llama_generated_hf_again"
        row(f"generated Llama ({total / 1e9:.2f} GB) export dense torch_dist -> HF Llama", total, largest,
            measure([py, "-m", "nemo_upcycle.export_hf", *model_overrides(big), f"model.dense_checkpoint={ckpt}",
                     "moe=dense", f"checkpoint={ckpt}", f"output_dir={out}", "progress=false",
                     "max_shard_size_gb=0.5"]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    base = rows[0]["peak_rss_bytes"]
    print()
    print(f"{'case':<78} {'model MB':>9} {'largest MB':>10} {'peak RSS MB':>11} {'- baseline':>10} {'s':>6}")
    for r in rows:
        print(f"{r['case']:<78} {r['model_bytes'] / 1e6:>9.0f} {r['largest_tensor_bytes'] / 1e6:>10.0f} "
              f"{r['peak_rss_bytes'] / 1e6:>11.0f} {(r['peak_rss_bytes'] - base) / 1e6:>10.0f} {r['wall_s']:>6}")
        r["peak_rss_above_baseline_bytes"] = r["peak_rss_bytes"] - base
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu_threads": 1, "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
