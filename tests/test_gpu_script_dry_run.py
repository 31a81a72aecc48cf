"""The GPU benchmark script cannot rot: its CPU dry run goes through every step on tiny sizes.

``DRY_RUN=1 bash benchmarks/gpu/run.sh`` prints the offline pip commands instead of running
them, then runs the upcycling-cost benchmark (ours vs megatron-core's path) and the
throughput benchmark (dense vs E8T2, megatron-core loop) on a 2-layer model and prints MFU.
"""
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # ~1 min; a hang guard
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "would run:" in out.stdout and "--no-index --find-links" in out.stdout
    cost = json.loads((tmp_path / "upcycle_cost.json").read_text())
    (case,) = cost["cases"]
    assert {p for p, r in case["paths"].items() if r["status"] == "ok"} == {"ours", "mcore"}
    assert case["summary"]["ratios_worst_rank"]["ours_over_mcore"] < 1.0
    throughput = json.loads((tmp_path / "train_throughput.json").read_text())
    assert set(throughput["runs"]) == {"dense", "moe_e8t2"}
    assert throughput["ratio"]["flops_per_token_moe_over_dense"] > 1.0
    assert "MFU" in out.stdout and "moe_e8t2" in out.stdout
