"""The ablation runner: its grid, its up-front checks, and the resume of an interrupted grid."""
import csv
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
        "e8t2_shared",
    ]
    assert runs[0].overrides[0] == "moe=dense" and runs[0].router is None
    assert runs[3].overrides == ("router=topk_softmax", "moe.capacity_factor=2.0")
    assert runs[1].overrides == ("router=topk_softmax", "moe.capacity_factor=null")
    # The shared-expert row: the first router's dropless row with another moe preset, same data and steps.
    shared = runs[-1]
    assert shared.overrides == ("moe=e8t2_shared", "router=topk_softmax", "moe.capacity_factor=null")
    assert (shared.router, shared.capacity_factor, shared.moe) == ("topk_softmax", None, "e8t2_shared")
    assert shared.label == "moe=e8t2_shared, topk_softmax, dropless" and runs[1].label == "topk_softmax, dropless"
    cfg = compose_config(list(shared.overrides))
    assert (cfg.moe.num_experts, cfg.moe.topk, cfg.moe.shared_expert.mode, cfg.moe.shared_expert.alpha) == (
        8, 2, "copy", 0.5)


def test_moe_presets_need_a_router_and_names_of_their_own():
    with pytest.raises(ValueError, match=r"ablate.routers, which is empty"):
        build_grid(compose_config(["ablate.routers=[]"]).ablate)
    with pytest.raises(ValueError, match=r"\['dense'\] twice"):
        build_grid(compose_config(["ablate.moe_presets=[dense]"]).ablate)
    ablate = compose_config(["ablate.moe_presets=[e8t2_shared,e8t2_g4_shared]", "ablate.only=[e8t2_g4_shared]"]).ablate
    assert [r.overrides[0] for r in build_grid(ablate)] == ["moe=e8t2_g4_shared"]


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


def test_report_holds_the_moe_preset_row(tmp_path):
    """The shared-expert row in the table, the CSV/JSON (with its preset) and both plots; a row
    of a grid run before presets existed (no "moe" key) is reported as before."""
    from nemo_upcycle.ablation.grid import GridRun
    from nemo_upcycle.ablation.report import write_report

    shared = GridRun("e8t2_shared", "topk_softmax", None, (), moe="e8t2_shared")
    def row(name, label, router, moe, losses, ppl, dropped):
        return {"name": name, "label": label, "router": router, "capacity_factor": None, **moe, "steps": 3,
                "final_loss": sum(losses) / 3, "losses": losses, "ppl": ppl, "mmlu_acc": 0.25, "mmlu_n": 8,
                "tokens_per_s": 100.0, "dropped_fraction": dropped, "max_load_ratio": dropped and 1.5,
                "router_entropy": dropped and 0.9, "wall_s": 10.0}
    results = [row("dense", "dense (continued training)", None, {}, [3.0, 2.9, 2.8], 20.0, None),
               row("topk_softmax-dropless", "topk_softmax, dropless", "topk_softmax", {}, [3.0, 2.8, 2.7], 19.0, 0.0),
               row(shared.name, shared.label, "topk_softmax", {"moe": shared.moe}, [3.0, 2.7, 2.6], 18.0, 0.0)]
    paths = write_report(results, tmp_path)
    assert "| moe=e8t2_shared, topk_softmax, dropless | 2.7667 | 18.000 | 25.0% | 100 | 0.000 | 0.00 | 10 |" in (
        paths["results.md"].read_text())
    csv_rows = list(csv.DictReader(paths["results.csv"].read_text().splitlines()))
    assert [(r["name"], r["moe"]) for r in csv_rows] == [("dense", ""), ("topk_softmax-dropless", ""),
                                                          ("e8t2_shared", "e8t2_shared")]
    assert json.loads(paths["results.json"].read_text())[2]["moe"] == "e8t2_shared"
    for plot in ("loss_curves.png", "eval_bars.png"):
        assert paths[plot].stat().st_size > 10_000


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
    assert "run e8t2_shared" not in out.stderr  # the shared-expert row composed and passed the checks
    assert not (tmp_path / "grid").exists()


def test_interrupted_grid_resumes_without_redoing_finished_runs(tiny_smollm_vocab, cache_dir, tmp_path):
    out_dir = tmp_path / "grid"
    # Two runs (dense and one router row): the shared-expert row trains like them, at a cost.
    command = _ablate_command(tiny_smollm_vocab, cache_dir, out_dir, "ablate.moe_presets=[]")
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
