"""The GPU device script cannot rot: its CPU dry run goes through every step on tiny sizes.

``DRY_RUN=1 bash benchmarks/gpu/run.sh`` prints the offline pip commands instead of running
them (no wheel is downloaded here), then runs benchmarks/gpu/device_run.py's steps in bf16
on CPU: a bf16 Llama written by transformers and its BPE tokenizer, (a) verify (MoE vs
dense, megatron-core vs transformers), (b) 3 training steps, a relaunch resuming to 6,
export_hf, the trained checkpoint vs its export in transformers, (c) dense vs E8T2
throughput (megatron-core's loop here; NeMo's trainer on the GPU).
"""
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from nemo_upcycle.upcycle.exactness import rounding_tolerance

REPO = Path(__file__).resolve().parents[1]
# A hang guard under pytest-timeout's 900 s (pyproject.toml), above the dry run's own 780 s budget
# (device_run.py), so the run's JSON is written before this kills anything.
TIMEOUT_S = 840


def test_gpu_script_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHONUNBUFFERED="1")
    env.pop("DEVICE_RUN_STARTED", None)
    # A session of its own: on a timeout the whole group goes (bash, torchrun and its ranks).
    proc = subprocess.Popen(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the dry run did not finish in {TIMEOUT_S}s:\n{stdout[-5000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, (stdout[-5000:], stderr[-3000:])
    assert "--no-index --no-deps" in stdout and "pip download --no-deps --only-binary=:all:" in stdout
    assert "megatron-core local spec" in stdout  # the run says which layer spec ran
    out = tmp_path / "out"
    doc = json.loads((out / "device_run.json").read_text())
    steps = doc["steps"]
    assert doc["failed_steps"] == [] and doc["skipped_steps"] == [], (doc["failed_steps"], doc["skipped_steps"])
    assert doc["wall_s"] < doc["budget_s"]
    assert doc["llama"]["torch_dtype"] == "bfloat16"

    # (a) verify's differences within the project's bf16 rounding rule (nemo_upcycle/upcycle/exactness.py)
    # on the dense logits' scale, which verify prints (measured here: 3.9e-3 and 3.8e-3 on logits
    # up to 0.74, tolerance 4.4e-2; a misread setting gives 5-10x the tolerance).
    v = steps["verify"]
    layers = doc["llama"]["num_hidden_layers"]
    tolerance = rounding_tolerance(torch.bfloat16, v["logit_scale"], layers)
    assert v["logit_scale"] > 0.5, v
    assert 0 <= v["max_abs_logit_diff"] <= tolerance, (v, tolerance)
    assert 0 <= v["import_max_abs_logit_diff"] <= tolerance, (v, tolerance)

    # (b) training resumed, and the trained checkpoint in megatron-core matches its export in
    # transformers within the same rule in fp32: the worker builds the checkpoint at
    # trainer.precision=auto, fp32 on a CPU (bf16 on the GPU), and transformers runs in fp32
    # (measured here: 1.8e-7 on logits up to 0.73, tolerance 2.7e-6); a wrong or missing tensor
    # in the export moves the logits by a fair part of their scale.
    assert steps["train_steps_1_to_3"]["upcycled"] and steps["train_resume_to_6"]["resumed"]
    assert steps["train_resume_to_6"]["steps_logged"][-1] == 6
    e = steps["trained_vs_export"]
    assert e["hf_class"] == "MixtralForCausalLM"
    assert e["logit_scale"] > 0.5, e
    assert e["max_abs_diff"] <= rounding_tolerance(torch.float32, e["logit_scale"], layers), e
    assert e["generation_equal"] and e["generated_tokens"] == 20, e

    throughput = steps["throughput"]
    assert {name for name, run in throughput["runs"].items() if run["status"] == "ok"} == {"dense", "moe_e8t2"}
    assert throughput["ratio"]["flops_per_token_moe_over_dense"] > 1.0
    assert (out / "device_run.log").stat().st_size > 0
    for name in steps:  # each step's output streamed to a log of its own
        assert (out / f"{name}.log").stat().st_size > 0, name
