"""The ablation runner: its grid, its up-front checks, and the resume of an interrupted grid."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nemo_upcycle.ablation.grid import build_grid
from nemo_upcycle.ablation.report import markdown_table
from nemo_upcycle.config.compose import compose_config
from tests.conftest import REPO


def test_default_grid_is_the_papers_table_shape():
    runs = build_grid(compose_config().ablate)
    assert [r.name for r in runs] == [
        "dense",
        "topk_softmax-dropless", "topk_softmax-cf1", "topk_softmax-cf2", "topk_softmax-cf4",
        "softmax_topk-dropless", "softmax_topk-cf1", "softmax_topk-cf2", "softmax_topk-cf4",
    ]
    assert runs[0].overrides[0] == "moe=dense" and runs[0].router is None
    assert runs[3].overrides == ("router=topk_softmax", "moe.capacity_factor=2.0")
    assert runs[1].overrides == ("router=topk_softmax", "moe.capacity_factor=null")


def test_only_rejects_names_outside_the_grid():
    ablate = compose_config(["ablate.only=[dense,topk_softmax-cf3]"]).ablate
    with pytest.raises(ValueError, match=r"topk_softmax-cf3"):
        build_grid(ablate)


def test_markdown_table_formats_each_column():
    rows = [{"label": "dense (continued training)", "final_loss": 3.14159, "ppl": 27.5, "mmlu_acc": 0.28125,
             "tokens_per_s": 99.6, "dropped_fraction": None, "max_load_ratio": None, "wall_s": 100.2},
            {"label": "topk_softmax, CF 1", "final_loss": 3.5, "ppl": 31.0, "mmlu_acc": 0.25,
             "tokens_per_s": 50.0, "dropped_fraction": 0.3333, "max_load_ratio": 2.4, "wall_s": 200}]
    lines = markdown_table(rows).splitlines()
    assert lines[2] == "| dense (continued training) | 3.1416 | 27.500 | 28.1% | 100 | - | - | 100 |"
    assert lines[3] == "| topk_softmax, CF 1 | 3.5000 | 31.000 | 25.0% | 50 | 0.333 | 2.40 | 200 |"


def _ablate_command(tiny_smollm_vocab, cache_dir, out_dir, *more):
    path, tokenizer = tiny_smollm_vocab
    return [sys.executable, "-m", "nemo_upcycle.ablate",
            f"ablate.out_dir={out_dir}", "ablate.nproc=1", "ablate.routers=[topk_softmax]",
            "ablate.capacity_factors=[2.0]", "ablate.base_overrides=['trainer=ablation']",
            "model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}",
            f"model.tokenizer={tokenizer}", f"cache_dir={cache_dir}",
            "trainer.seq_length=64", "trainer.max_steps=3", "trainer.lr=1e-3",
            "eval.tasks=[mmlu_anatomy,heldout_news]", "eval.limit=2", *more]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _still_running(pattern: str, within_s: float) -> str:
    """Processes matching ``pattern`` that are still alive (not zombies) after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        alive = [p for p in pids if _state(p) not in ("Z", "")]
        if not alive or time.monotonic() > deadline:
            return " ".join(alive)
        time.sleep(0.5)


def _state(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_bad_run_config_fails_before_any_run(tiny_smollm_vocab, cache_dir, tmp_path):
    out = subprocess.run(_ablate_command(tiny_smollm_vocab, cache_dir, tmp_path / "grid", "ablate.capacity_factors=[-1]"),
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 2
    assert "run topk_softmax-cf-1: moe.capacity_factor=-1.0" in out.stderr
    assert not (tmp_path / "grid").exists()


def test_interrupted_grid_resumes_without_redoing_finished_runs(tiny_smollm_vocab, cache_dir, tmp_path):
    out_dir = tmp_path / "grid"
    command = _ablate_command(tiny_smollm_vocab, cache_dir, out_dir)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=_env())
    second_run = out_dir / "topk_softmax-cf2"
    deadline = time.monotonic() + 240
    try:
        # Interrupt while the second run trains: the first run has finished and been recorded.
        while not (second_run / "metrics.jsonl").is_file():
            assert first.poll() is None, "the grid ended before its second run started training"
            assert time.monotonic() < deadline, "the second run did not start training within 240 s"
            time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) != 0
    finally:
        if first.poll() is None:
            first.kill()
    assert not _still_running(f"log_dir={second_run}", within_s=15), "the interrupted run's ranks are still running"
    dense_result = json.loads((out_dir / "dense" / "result.json").read_text())
    assert not (second_run / "result.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[1/2] dense: finished earlier, reusing" in second.stdout
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["name"] for r in results] == ["dense", "topk_softmax-cf2"]
    assert results[0] == dense_result  # reused as it was, not recomputed
    moe = results[1]
    assert moe["steps"] == 3 and len(moe["losses"]) == 3  # the interrupted run was redone from step 1
    assert moe["mmlu_n"] == 2 and moe["ppl"] > 1 and moe["dropped_fraction"] is not None
    table = (out_dir / "results.md").read_text()
    assert "| dense (continued training) |" in table and "| topk_softmax, CF 2 |" in table
    for plot in ("loss_curves.png", "eval_bars.png"):
        assert (out_dir / plot).stat().st_size > 10_000
