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
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHONUNBUFFERED="1")
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)  # a hang guard
    assert out.returncode == 0, (out.stdout[-5000:], out.stderr[-3000:])
    assert "--no-index --no-deps" in out.stdout and "pip download --no-deps --only-binary=:all:" in out.stdout
    assert "megatron-core local spec" in out.stdout  # the run says which layer spec ran
    doc = json.loads((tmp_path / "out" / "device_run.json").read_text())
    steps = doc["steps"]
    assert doc["failed_steps"] == [], doc["failed_steps"]
    assert doc["llama"]["torch_dtype"] == "bfloat16"
    assert steps["verify"]["max_abs_logit_diff"] >= 0 and steps["verify"]["import_max_abs_logit_diff"] >= 0
    assert steps["train_steps_1_to_3"]["upcycled"] and steps["train_resume_to_6"]["resumed"]
    assert steps["train_resume_to_6"]["steps_logged"][-1] == 6
    assert steps["trained_vs_export"]["hf_class"] == "MixtralForCausalLM"
    throughput = steps["throughput"]
    assert {name for name, run in throughput["runs"].items() if run["status"] == "ok"} == {"dense", "moe_e8t2"}
    assert throughput["ratio"]["flops_per_token_moe_over_dense"] > 1.0
    assert (tmp_path / "out" / "device_run.log").stat().st_size > 0
