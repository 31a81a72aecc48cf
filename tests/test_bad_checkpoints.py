"""Checkpoints nemo-upcycle cannot reproduce exactly, through every entry point a user runs.

Each folder is written by transformers and then broken the way users meet it (an
unsupported RoPE type, a sliding window, an unknown model_type, a Qwen2 folder relabelled
llama, a missing shard, a command-line value that contradicts the checkpoint). ``train``,
``verify``, ``export_hf`` and ``import_dense`` must each exit 2 with a message naming the
field and both values, print no traceback, and leave nothing behind: no output folder, no
log_dir, no Hydra ``outputs/``, no log file in the working directory.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.support.tiny_hf import write_tiny_hf
from tests.conftest import REPO


def _relabel(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def _drop_a_shard(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[1]).unlink()
    return folder


# name -> (make the folder, extra model.* overrides, what the message must say)
CASES = {
    "yarn": (lambda p: write_tiny_hf("llama", p, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                  original_max_position_embeddings=256)),
             [], "rope_scaling.rope_type='yarn'"),
    "sliding_window": (lambda p: write_tiny_hf("mistral", p, sliding_window=64), [],
                       "sliding_window=64 is shorter than max_position_embeddings=2048"),
    "model_type": (lambda p: _relabel(write_tiny_hf("llama", p), model_type="phi3"), [], "model_type='phi3'"),
    "relabelled_qwen2": (lambda p: _relabel(write_tiny_hf("qwen2", p), model_type="llama"), [],
                         "model.layers.0.self_attn.k_proj.bias"),
    "missing_shard": (lambda p: _drop_a_shard(write_tiny_hf("llama", p, max_shard_size="100KB")), [],
                      "shard(s) named by model.safetensors.index.json are missing"),
    "rotary_base": (lambda p: write_tiny_hf("llama31", p), ["model.rotary_base=10000"],
                    "model.rotary_base=10000.0 but the checkpoint has 500000.0"),
    "tie_embeddings": (lambda p: write_tiny_hf("llama", p), ["model.tie_embeddings=true"],
                       "model.tie_embeddings=True but the checkpoint has False"),
}


def _commands(folder, overrides, out):
    model = ["model=auto", f"model.dense_checkpoint={folder}", *overrides]
    commands = {
        "train": ["nemo_upcycle.train", *model, f"log_dir={out}"],
        "verify": ["nemo_upcycle.verify", *model],
        "export_hf": ["nemo_upcycle.export_hf", *model, f"output_dir={out}"],
    }
    if not overrides:  # import_dense takes the folder as it is
        commands["import_dense"] = ["nemo_upcycle.import_dense", f"source={folder}", f"output_dir={out}"]
    return commands


@pytest.mark.parametrize("case", list(CASES))
def test_refused_by_every_entry_point_with_nothing_written(case, tmp_path):
    make, overrides, needle = CASES[case]
    folder = make(tmp_path / "model")
    before = sorted(p.name for p in folder.iterdir())
    runs = {}
    for name, args in _commands(folder, overrides, tmp_path / "out" / "result").items():
        cwd = tmp_path / f"cwd_{name}"
        cwd.mkdir()
        # All four at once: each fails in its first seconds, before any weight is read.
        runs[name] = (cwd, subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")))
    for name, (cwd, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
        assert needle in stderr, f"{name}: {stderr[-2000:]}"
        assert "Traceback" not in stderr + stdout, f"{name}: {stderr[-3000:]}"
        assert not list(cwd.iterdir()), f"{name} wrote {list(cwd.iterdir())} in its working directory"
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in folder.iterdir()) == before
