"""What one GPU lease measures, in one call: run by ``benchmarks/gpu/run.sh``.

    python benchmarks/gpu/device_run.py --out DIR [--dry-run]

Every step is the product's own command (``torchrun --nproc_per_node=1 -m nemo_upcycle.<cmd>``)
on one GPU, in bf16, with megatron-core's local layer spec (Transformer Engine cannot be
installed within a lease: ``transformer-engine-torch`` ships only as source to compile):

0. a Llama written there by transformers in bf16 (``nemo_upcycle.testing.tiny_hf``) with a
   byte-level BPE tokenizer trained there on gensim's held-out news text (no model hub, no
   embedded 270 MB model);
(a) ``verify`` of that bf16 HF folder: upcycled E8T2 vs dense logits, megatron-core vs
    transformers logits;
(b) 3 training steps, a relaunch that resumes to step 6, ``export_hf`` of the trained
    checkpoint, and transformers' logits on the export vs megatron-core's on the checkpoint;
(c) dense vs E8T2 training throughput (``benchmarks/train_throughput.py``, NeMo's trainer) on
    Llama 3.2 1B's widths and vocabulary with 6 layers at sequence 2048: tokens/s, the
    step-time ratio against the FLOPs ratio, MFU against the device's dense bf16 peak.

Writes ``DIR/device_run.json`` (one record per step: command, exit status, wall time, the
numbers parsed from its output) and prints every command's output (run.sh keeps it in
``DIR/device_run.log``). A failed step is recorded and the next one still runs, so one call
shows everything; the exit status is 1 if any step failed.

``--dry-run``: the same steps on tiny sizes on a CPU (tests/test_gpu_script_dry_run.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Everything the run imports, checked by prove_wheels.sh against the carried wheels plus the
# lent image's packages before any lease.
IMPORTED_MODULES = (
    # nemo.collections.llm.api apart: the collection turns its ImportError into a warning, and
    # llm.train (what training calls) is then silently missing.
    "megatron.core", "megatron.core.datasets.helpers_cpp", "nemo.collections.llm", "nemo.collections.llm.api",
    "nemo.lightning", "hydra", "omegaconf", "transformers", "transformers.models.mixtral", "tokenizers", "gguf",
    "mwparserfromhell", "nemo_upcycle.cli.train", "nemo_upcycle.cli.verify", "nemo_upcycle.cli.export_hf",
    "nemo_upcycle.training.model_config", "nemo_upcycle.training.job", "nemo_upcycle.evaluation.backends",
    "benchmarks.train_throughput", "tests.workers.export_trained_checks",
)

# Sizes: the lease's, and the dry run's (seconds on 2 CPU cores).
SIZES = {
    "gpu": dict(
        llama=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4),
        vocab=8192, verify_seq=512, train=["trainer.seq_length=1024", "trainer.micro_batch_size=4",
                                           "trainer.global_batch_size=8"],
        throughput=["--model", "llama_1b_6l", "--seq", "2048", "--micro-batch", "2", "--steps", "20",
                    "--warm", "5", "--backend", "nemo"],
    ),
    "dry": dict(
        llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2),
        vocab=512, verify_seq=64, train=["trainer.seq_length=64", "trainer.micro_batch_size=1",
                                         "trainer.global_batch_size=2"],
        # megatron-core's loop (seconds to start), not NeMo's trainer: the dry run stays cheap;
        # (b) runs NeMo's trainer with the same settings.
        throughput=["--model", "tiny_dry", "--seq", "64", "--micro-batch", "1", "--steps", "3", "--warm", "1",
                    "--backend", "mcore"],
    ),
}
# The dense bf16 peak MFU is measured against when the device table does not name the GPU
# (H100 SXM and H200: nemo_upcycle/capacity/budget.py).
HOPPER_PEAK_TFLOPS = 989.4
NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def run(name: str, cmd: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """One step: its output printed under a header, its record returned (never raises)."""
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "timeout"
    print(out, flush=True)
    record = {"command": " ".join(cmd), "exit": rc, "wall_s": round(time.perf_counter() - started, 1)}
    print(f"== {name}: exit {rc} after {record['wall_s']}s", flush=True)
    return record | {"output": out}


def torchrun(command: str, overrides: list[str]) -> list[str]:
    from nemo_upcycle.util.ports import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
            "--max_restarts=0", "-m", f"nemo_upcycle.{command}", *overrides]


def key_values(output: str) -> dict:
    """``name=number`` pairs the commands print on their last lines (verify's differences)."""
    return {k: float(v) for k, v in re.findall(rf"\b([a-z_]+)=({NUMBER})(?![\w.])", output)}


def write_bpe_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer trained on the held-out news text (seconds), saved as an HF
    tokenizer folder: real text becomes real tokens without a model hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nemo_upcycle.data.text import heldout_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([heldout_text()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def write_llama(folder: Path, sizes: dict) -> dict:
    """The bf16 Llama (as Llama 3 ships) and its tokenizer, written by transformers."""
    import torch

    from nemo_upcycle.testing.tiny_hf import write_tiny_hf

    write_bpe_tokenizer(folder, sizes["vocab"])
    write_tiny_hf("llama", folder, dtype=torch.bfloat16, vocab_size=sizes["vocab"], **sizes["llama"])
    config = json.loads((folder / "config.json").read_text())
    return {"folder": str(folder), "torch_dtype": config.get("torch_dtype", config.get("dtype")),
            **sizes["llama"], "vocab_size": sizes["vocab"]}


def write_corpus(path: Path, doc_chars: int = 4000) -> Path:
    """The held-out news text as a JSONL corpus (``data.jsonl``): tokenized in a second or
    two, where the Wikipedia sample takes most of a minute on every fresh cache."""
    from nemo_upcycle.data.text import heldout_text

    text = heldout_text()
    docs = [text[i:i + doc_chars] for i in range(0, len(text), doc_chars)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def data_overrides(corpus: Path) -> list[str]:
    """The corpus; short runs may repeat it, say so where the data checks ask (issue 26)."""
    from nemo_upcycle.config.schema import DataConfig

    return [f"data.jsonl={corpus}", *(["data.allow_repeats=true"] if hasattr(DataConfig, "allow_repeats") else [])]


def peak_tflops() -> tuple[float, str]:
    import torch

    from nemo_upcycle.capacity.budget import gpu_for_device_name

    if not torch.cuda.is_available():
        return HOPPER_PEAK_TFLOPS, "no GPU (dry run): the H100 SXM / H200 dense bf16 peak"
    name = torch.cuda.get_device_name()
    gpu = gpu_for_device_name(name)
    if gpu is None:
        return HOPPER_PEAK_TFLOPS, f"{name!r} is not in the device table: the H100 SXM / H200 peak assumed"
    return gpu.bf16_tflops, f"device table: {name!r} is {gpu.name}"


def describe_device() -> dict:
    import torch

    from nemo_upcycle.model.modeling import transformer_engine_available

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "transformer_engine": transformer_engine_available(),
           "layer_spec": "Transformer Engine" if transformer_engine_available()
           else "megatron-core local spec (Transformer Engine is not installed: it compiles from source)"}
    if torch.cuda.is_available():
        out |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    import megatron.core
    import nemo
    import transformers

    out |= {"megatron_core": megatron.core.__version__, "nemo": nemo.__version__, "transformers": transformers.__version__}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    work = Path(args.work or tempfile.mkdtemp(prefix="device-run-"))
    cache = work / "cache"
    common = [f"cache_dir={cache}", "trainer.precision=bf16"]
    doc: dict = {"benchmark": "gpu device run", "dry_run": args.dry_run, "steps": {}}
    steps = doc["steps"]
    started = time.perf_counter()

    def finish(name: str, record: dict, **parsed) -> dict:
        record = {k: v for k, v in record.items() if k != "output"} | parsed
        steps[name] = record
        (out / "device_run.json").write_text(json.dumps(doc, indent=1))
        return record

    doc["device"] = describe_device()
    print(json.dumps(doc["device"]), flush=True)
    print(f"layer spec: {doc['device']['layer_spec']}", flush=True)
    hf = work / "Llama-bf16"
    doc["llama"] = write_llama(hf, sizes)
    data = data_overrides(write_corpus(work / "corpus.jsonl"))
    model = [f"model=auto", f"model.dense_checkpoint={hf}", "moe=e8t2", "router=topk_softmax"]

    # (a) verify: upcycled vs dense, megatron-core vs transformers, in bf16 on one device.
    record = run("verify", torchrun("verify", [*model, *common, f"verify.seq_length={sizes['verify_seq']}",
                                               f"log_dir={work / 'verify'}"]), timeout_s=240)
    finish("verify", record, **key_values(record["output"]))

    # (b) 3 steps, a relaunch that resumes to step 6, the export, its logits vs megatron-core's.
    run_dir = work / "train"
    train = [*model, *common, *sizes["train"], *data, f"log_dir={run_dir}", "trainer.lr=1e-4",
             "trainer.min_lr=1e-5", "trainer.warmup_steps=1", "trainer.checkpoint_every_n_steps=3",
             "trainer.val_check_interval=3", "trainer.limit_val_batches=1"]
    first = run("train_steps_1_to_3", torchrun("train", [*train, "trainer.max_steps=3"]), timeout_s=300)
    finish("train_steps_1_to_3", first, upcycled="upcycling online" in first["output"])
    second = run("train_resume_to_6", torchrun("train", [*train, "trainer.max_steps=6"]), timeout_s=300)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    finish("train_resume_to_6", second, resumed="resuming from" in second["output"],
           steps_logged=[r.get("step") for r in records], losses=[r.get("loss") for r in records],
           step_time_s=[round(r["step_time_s"], 4) for r in records if "step_time_s" in r])
    export_dir = work / "export"
    record = run("export_hf", torchrun("export_hf", [f"checkpoint={run_dir}", f"output_dir={export_dir}",
                                                     f"cache_dir={cache}"]), timeout_s=240)
    finish("export_hf", record)
    from nemo_upcycle.testing.multirank import run_on_ranks

    print("\n== trained checkpoint in megatron-core vs its export in transformers", flush=True)
    t = time.perf_counter()
    try:
        (result,) = run_on_ranks("tests.workers.export_trained_checks:trained_vs_export", 1, timeout_s=300,
                                 checkpoint=str(run_dir), hf_dir=str(export_dir))
        finish("trained_vs_export", {"exit": 0, "wall_s": round(time.perf_counter() - t, 1)}, **result)
    except Exception as err:  # recorded; the throughput step still runs
        finish("trained_vs_export", {"exit": 1, "wall_s": round(time.perf_counter() - t, 1), "error": str(err)[-3000:]})
    print(json.dumps(steps["trained_vs_export"]), flush=True)

    # (c) dense vs E8T2 training throughput, NeMo's trainer, bf16.
    peak, peak_source = peak_tflops()
    doc["peak_tflops"], doc["peak_source"] = peak, peak_source
    throughput_json = work / "train_throughput.json"
    record = run("throughput", [sys.executable, "benchmarks/train_throughput.py", *sizes["throughput"], "--nproc", "1",
                                "--no-profile", "--tokenizer", str(hf), "--cache-dir", str(cache),
                                "--peak-tflops", str(peak), "--max-wait-min", "2", "--timeout-min", "5",
                                "--out", str(throughput_json), "--extra", "trainer.precision=bf16", *data],
                 timeout_s=660)
    result = json.loads(throughput_json.read_text()) if throughput_json.exists() else {}
    finish("throughput", record, ratio=result.get("ratio"), runs={
        name: {k: r.get(k) for k in ("status", "reason", "tokens_per_s", "step_time_s_median", "mfu",
                                     "mfu_logged_median", "train_flops_per_token", "loss_first_last")}
        for name, r in result.get("runs", {}).items()})

    doc["wall_s"] = round(time.perf_counter() - started, 1)
    failed = [name for name, r in steps.items() if r.get("exit") != 0]
    doc["failed_steps"] = failed
    (out / "device_run.json").write_text(json.dumps(doc, indent=1))
    print("\n== summary", flush=True)
    print(summary(doc), flush=True)
    return 1 if failed else 0


def summary(doc: dict) -> str:
    s = doc["steps"]
    lines = [f"device: {doc['device'].get('gpu', 'CPU (dry run)')}; {doc['device']['layer_spec']}"]
    v = s.get("verify", {})
    lines.append(f"(a) verify exit {v.get('exit')}: MoE vs dense max |diff| {v.get('max_abs_logit_diff')}, "
                 f"megatron-core vs transformers {v.get('import_max_abs_logit_diff')}")
    r = s.get("train_resume_to_6", {})
    e = s.get("trained_vs_export", {})
    lines.append(f"(b) train steps {r.get('steps_logged')} resumed={r.get('resumed')} losses {r.get('losses')}; "
                 f"export exit {s.get('export_hf', {}).get('exit')}; trained vs export max |diff| "
                 f"{e.get('max_abs_diff')} (logit scale {e.get('logit_scale')}), greedy equal {e.get('generation_equal')}")
    t = s.get("throughput", {})
    for name, run_ in (t.get("runs") or {}).items():
        lines.append(f"(c) {name:<9} {run_.get('tokens_per_s')} tok/s, step {run_.get('step_time_s_median')} s, "
                     f"MFU {run_.get('mfu')} (peak {doc.get('peak_tflops')} TFLOP/s: {doc.get('peak_source')})")
    lines.append(f"(c) ratio {json.dumps(t.get('ratio'))}")
    lines.append(f"failed steps: {doc.get('failed_steps')}; wall {doc.get('wall_s')} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
