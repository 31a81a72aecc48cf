"""What one GPU lease measures, in one call: run by ``benchmarks/gpu/run.sh``.

    python benchmarks/gpu/device_run.py --out DIR [--dry-run]

Each step is a process of its own under ``torchrun --nproc_per_node=1`` on one GPU, in bf16,
with megatron-core's local layer spec (Transformer Engine cannot be installed within a lease:
``transformer-engine-torch`` ships only as source to compile): the product's own commands
(``-m nemo_upcycle.<cmd>``) for verify, training and the export; the comparison of the trained
checkpoint with its export is the test suite's worker (``tests/workers/export_trained_checks.py``,
as tests/test_export_trained.py runs it), and (c) is ``benchmarks/train_throughput.py``, which
runs the product's training job once per model:

0. a Llama written there by transformers in bf16 (``tests.support.tiny_hf``) with a
   byte-level BPE tokenizer trained there on gensim's held-out news text (no model hub, no
   embedded 270 MB model);
(a) ``verify`` of that bf16 HF folder: upcycled E8T2 vs dense logits, megatron-core vs
    transformers logits;
(b) 3 training steps, a relaunch that resumes to step 6, ``export_hf`` of the trained
    checkpoint, and transformers' logits on the export vs megatron-core's on the checkpoint
    (``trained_vs_export``);
(c) dense vs E8T2 training throughput (``benchmarks/train_throughput.py``, NeMo's trainer) on
    Llama 3.2 1B's widths and vocabulary with 6 layers at sequence 2048: tokens/s, the
    step-time ratio against the FLOPs ratio, MFU against the device's dense bf16 peak.

Writes ``DIR/device_run.json`` (one record per step: command, exit status, wall time, the
numbers parsed from its output), again after every step, so a run killed from outside still
leaves the steps done so far. Each step's output is streamed, as it comes, to ``DIR/<step>.log``
and to stdout (run.sh keeps stdout in ``DIR/device_run.log``). A failed step is recorded and the
next one still runs, so one call shows everything; the exit status is 1 if any step failed or
was skipped.

The whole run has one deadline (``--budget-s``, default ``$DEVICE_RUN_BUDGET_S``, else 470 s
on the GPU, 780 s in a dry run), counted from ``$DEVICE_RUN_STARTED`` (epoch seconds; run.sh
sets it when it starts, so the wheel install counts) or else from this script's start: the
device tool's call has about 560 s in all. Each step runs for at most ``min(its own limit, the
time left)``; one that finds less than 20 s left is not started and is recorded as
``"exit": "skipped"`` with the reason; (c) gets train_throughput's ``--budget-min`` from the time
left. The JSON and the summary are written however the run ends.

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
import threading
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
    "mwparserfromhell", "nemo_upcycle.train", "nemo_upcycle.verify", "nemo_upcycle.export_hf",
    "nemo_upcycle.training.model_config", "nemo_upcycle.training.job", "nemo_upcycle.evaluation.backends",
    "benchmarks.train_throughput", "tests.workers.export_trained_checks", "tests.support.rank_entry",
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
# (H100 SXM and H200: nemo_upcycle/planner/budget.py).
HOPPER_PEAK_TFLOPS = 989.4
NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
# The deadline of the whole run, in seconds from its start (the device tool's call has ~560 s).
BUDGET_S = {"gpu": 470.0, "dry": 780.0}
MIN_STEP_S = 20.0  # a step is not started with less time left than this
STEPS = ("verify", "train_steps_1_to_3", "train_resume_to_6", "export_hf", "trained_vs_export", "throughput")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(name: str, cmd: list[str], timeout_s: float, log_dir: Path) -> dict:
    """One step: its output streamed, as it comes, to stdout under a header and to
    ``log_dir/<name>.log``; its process group killed after ``timeout_s``; its record returned."""
    print(f"\n== {name}: {' '.join(cmd)} (limit {timeout_s:.0f}s)", flush=True)
    started = time.perf_counter()
    timed_out = threading.Event()
    lines: list[str] = []
    with open(log_dir / f"{name}.log", "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        timer = threading.Timer(timeout_s, lambda: (timed_out.set(), _kill_group(proc)))
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
                lines.append(line)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # interrupted here: the step's processes go too
                _kill_group(proc)
                proc.wait()
        rc = "timeout" if timed_out.is_set() else proc.returncode
        record = {"command": " ".join(cmd), "exit": rc, "wall_s": round(time.perf_counter() - started, 1),
                  "log": f"{name}.log"}
        log.write(f"== exit {rc} after {record['wall_s']}s\n")
    print(f"== {name}: exit {rc} after {record['wall_s']}s", flush=True)
    return record | {"output": "".join(lines)}


def torchrun(module: str, args: list[str]) -> list[str]:
    from nemo_upcycle.util.ports import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
            "--max_restarts=0", "-m", module, *args]


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

    from tests.support.tiny_hf import write_tiny_hf

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
    return [f"data.jsonl={corpus}", "data.allow_repeats=true"]


def peak_tflops() -> tuple[float, str]:
    import torch

    from nemo_upcycle.planner.budget import gpu_for_device_name

    if not torch.cuda.is_available():
        return HOPPER_PEAK_TFLOPS, "no GPU (dry run): the H100 SXM / H200 dense bf16 peak"
    name = torch.cuda.get_device_name()
    gpu = gpu_for_device_name(name)
    if gpu is None:
        return HOPPER_PEAK_TFLOPS, f"{name!r} is not in the device table: the H100 SXM / H200 peak assumed"
    return gpu.bf16_tflops, f"device table: {name!r} is {gpu.name}"


def describe_device() -> dict:
    import torch

    from nemo_upcycle.model.fused_paths import transformer_engine_available

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
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds from the start ($DEVICE_RUN_STARTED, else now) by which everything ends "
                             "(default: $DEVICE_RUN_BUDGET_S, else 470 on the GPU, 780 in a dry run)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = "dry" if args.dry_run else "gpu"
    sizes = SIZES[size]
    budget = args.budget_s or float(os.environ.get("DEVICE_RUN_BUDGET_S") or BUDGET_S[size])
    t0 = float(os.environ.get("DEVICE_RUN_STARTED") or time.time())
    deadline = t0 + budget
    work = Path(args.work or tempfile.mkdtemp(prefix="device-run-"))
    cache = work / "cache"
    common = [f"cache_dir={cache}", "trainer.precision=bf16"]
    doc: dict = {"benchmark": "gpu device run", "dry_run": args.dry_run, "budget_s": budget,
                 "budget_counted_from": "run.sh's start" if os.environ.get("DEVICE_RUN_STARTED") else "device_run's start",
                 "steps": {}}
    steps = doc["steps"]

    def write() -> None:
        doc["wall_s"] = round(time.time() - t0, 1)
        doc["failed_steps"] = [n for n, r in steps.items() if r.get("exit") not in (0, "skipped")]
        doc["skipped_steps"] = [n for n, r in steps.items() if r.get("exit") == "skipped"]
        tmp = out / "device_run.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out / "device_run.json")

    def finish(name: str, record: dict, **parsed) -> dict:
        record = {k: v for k, v in record.items() if k != "output"} | parsed
        steps[name] = record
        write()
        return record

    def limit(name: str, own_s: float) -> float | None:
        """min(the step's own limit, the time left); None (the step recorded as skipped) when too little is left."""
        left = deadline - time.time()
        if left < MIN_STEP_S:
            finish(name, {"exit": "skipped", "reason": f"{max(left, 0):.0f}s left of the {budget:.0f}s budget "
                                                        f"(a step needs {MIN_STEP_S:.0f}s)"})
            print(f"\n== {name}: skipped, {max(left, 0):.0f}s left of the {budget:.0f}s budget", flush=True)
            return None
        return min(own_s, left)

    def on_term(signum, frame):  # the JSON and the summary are still written (finally below)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        steps_run(doc, steps, finish, limit, sizes, work, cache, common, out)
    except BaseException as err:  # recorded: the JSON and summary below are what the call brings back
        doc["error"] = f"{type(err).__name__}: {err}"[-3000:]
        print(f"\n== device run stopped: {doc['error']}", flush=True)
    finally:
        for name in STEPS:  # a step the run never reached is in the JSON too
            steps.setdefault(name, {"exit": "not run", "reason": doc.get("error", "")})
        write()
        print("\n== summary", flush=True)
        print(summary(doc), flush=True)
    return 1 if doc["failed_steps"] or doc["skipped_steps"] or "error" in doc else 0


def steps_run(doc: dict, steps: dict, finish, limit, sizes: dict, work: Path, cache: Path, common: list[str],
              out: Path) -> None:
    """Step 0, then (a) to (c) in order: each under ``limit``, each recorded by ``finish``."""
    doc["device"] = describe_device()
    print(json.dumps(doc["device"]), flush=True)
    print(f"layer spec: {doc['device']['layer_spec']}", flush=True)
    hf = work / "Llama-bf16"
    doc["llama"] = write_llama(hf, sizes)
    data = data_overrides(write_corpus(work / "corpus.jsonl"))
    model = [f"model=auto", f"model.dense_checkpoint={hf}", "moe=e8t2", "router=topk_softmax"]

    # (a) verify: upcycled vs dense, megatron-core vs transformers, in bf16 on one device.
    if (t := limit("verify", 240)) is not None:
        record = run("verify", torchrun("nemo_upcycle.verify", [*model, *common, f"verify.seq_length={sizes['verify_seq']}",
                                                                f"log_dir={work / 'verify'}"]), t, out)
        scale = re.search(rf"dense logits up to ({NUMBER}) in magnitude", record["output"])
        finish("verify", record, **key_values(record["output"]),
               **({"logit_scale": float(scale.group(1))} if scale else {}))

    # (b) 3 steps, a relaunch that resumes to step 6, the export, its logits vs megatron-core's.
    run_dir = work / "train"
    train = [*model, *common, *sizes["train"], *data, f"log_dir={run_dir}", "trainer.lr=1e-4",
             "trainer.min_lr=1e-5", "trainer.warmup_steps=1", "trainer.checkpoint_every_n_steps=3",
             "trainer.val_check_interval=3", "trainer.limit_val_batches=1"]
    if (t := limit("train_steps_1_to_3", 300)) is not None:
        first = run("train_steps_1_to_3", torchrun("nemo_upcycle.train", [*train, "trainer.max_steps=3"]), t, out)
        finish("train_steps_1_to_3", first, upcycled="upcycling online" in first["output"])
    if (t := limit("train_resume_to_6", 300)) is not None:
        second = run("train_resume_to_6", torchrun("nemo_upcycle.train", [*train, "trainer.max_steps=6"]), t, out)
        metrics = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        finish("train_resume_to_6", second, resumed="resuming from" in second["output"],
               steps_logged=[r.get("step") for r in records], losses=[r.get("loss") for r in records],
               step_time_s=[round(r["step_time_s"], 4) for r in records if "step_time_s" in r])
    export_dir = work / "export"
    if (t := limit("export_hf", 240)) is not None:
        record = run("export_hf", torchrun("nemo_upcycle.export_hf", [f"checkpoint={run_dir}", f"output_dir={export_dir}",
                                                                      f"cache_dir={cache}"]), t, out)
        finish("export_hf", record)
    # The test suite's worker (tests/test_export_trained.py's), launched as run_on_ranks does.
    if (t := limit("trained_vs_export", 300)) is not None:
        compare = work / "trained_vs_export"
        compare.mkdir(parents=True, exist_ok=True)
        (compare / "kwargs.json").write_text(json.dumps({"checkpoint": str(run_dir), "hf_dir": str(export_dir)}))
        record = run("trained_vs_export", torchrun("tests.support.rank_entry", [
            "tests.workers.export_trained_checks:trained_vs_export", str(compare)]), t, out)
        result_file = compare / "result_0.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if record["exit"] == 0 and not result:
            record["exit"] = "no result"
        finish("trained_vs_export", record, **result)
        print(json.dumps(steps["trained_vs_export"]), flush=True)

    # (c) dense vs E8T2 training throughput, NeMo's trainer, bf16: train_throughput.py ends its
    # runs within the time left (less a margin to write its JSON), this step's limit is the backstop.
    peak, peak_source = peak_tflops()
    doc["peak_tflops"], doc["peak_source"] = peak, peak_source
    throughput_json = work / "train_throughput.json"
    if (t := limit("throughput", 660)) is not None:
        inner_min = max(t - 15, 1) / 60
        record = run("throughput", [sys.executable, "benchmarks/train_throughput.py", *sizes["throughput"], "--nproc", "1",
                                    "--no-profile", "--tokenizer", str(hf), "--cache-dir", str(cache),
                                    "--peak-tflops", str(peak), "--max-wait-min", f"{min(2, inner_min):.2f}",
                                    "--timeout-min", f"{min(5, inner_min):.2f}", "--budget-min", f"{inner_min:.2f}",
                                    "--out", str(throughput_json), "--extra", "trainer.precision=bf16", *data], t, out)
        result = json.loads(throughput_json.read_text()) if throughput_json.exists() else {}
        finish("throughput", record, ratio=result.get("ratio"), runs={
            name: {k: r.get(k) for k in ("status", "reason", "tokens_per_s", "step_time_s_median", "mfu",
                                         "mfu_logged_median", "train_flops_per_token", "loss_first_last")}
            for name, r in result.get("runs", {}).items()})


def summary(doc: dict) -> str:
    s = doc["steps"]
    device = doc.get("device", {})
    lines = [f"device: {device.get('gpu', 'CPU (dry run)')}; {device.get('layer_spec')}"]
    v = s.get("verify", {})
    lines.append(f"(a) verify exit {v.get('exit')}: MoE vs dense max |diff| {v.get('max_abs_logit_diff')}, "
                 f"megatron-core vs transformers {v.get('import_max_abs_logit_diff')} (logit scale {v.get('logit_scale')})")
    r = s.get("train_resume_to_6", {})
    e = s.get("trained_vs_export", {})
    lines.append(f"(b) train steps {r.get('steps_logged')} resumed={r.get('resumed')} losses {r.get('losses')}; "
                 f"export exit {s.get('export_hf', {}).get('exit')}; trained vs export max |diff| "
                 f"{e.get('max_abs_diff')} (logit scale {e.get('logit_scale')}), greedy equal {e.get('generation_equal')}")
    t = s.get("throughput", {})
    for name, run_ in (t.get("runs") or {}).items():
        if run_.get("status") != "ok":
            lines.append(f"(c) {name:<9} {run_.get('status')}: {str(run_.get('reason'))[-300:]}")
            continue
        lines.append(f"(c) {name:<9} {run_.get('tokens_per_s')} tok/s, step {run_.get('step_time_s_median')} s, "
                     f"MFU {run_.get('mfu')} (peak {doc.get('peak_tflops')} TFLOP/s: {doc.get('peak_source')})")
    lines.append(f"(c) ratio {json.dumps(t.get('ratio'))}")
    lines.append(f"failed steps: {doc.get('failed_steps')}; skipped for lack of time: {doc.get('skipped_steps')}; "
                 f"wall {doc.get('wall_s')} s of the {doc.get('budget_s')} s budget"
                 + (f"; stopped by {doc['error']}" if "error" in doc else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
