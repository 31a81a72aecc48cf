"""Helpers shared by the checkpoint import/export tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> args`` in a fresh process (one thread: the CPU is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def export(output_dir: Path, *overrides: str) -> str:
    return check_ok(run_cli("nemo_upcycle.export_hf", f"output_dir={output_dir}", "progress=false", *overrides))


def import_dense(source: Path | str, output_dir: Path, *more: str) -> str:
    return check_ok(run_cli("nemo_upcycle.import_dense", f"source={source}", f"output_dir={output_dir}",
                            "progress=false", *more))


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (small checkpoints only)."""
    from nemo_upcycle.checkpoint.sources.slices import SliceRequest
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    ckpt = TorchDistCheckpoint(path)
    out = {}
    for key, shape in ckpt.tensor_shapes().items():
        out[key] = torch.empty(shape, dtype=ckpt.metadata.state_dict_metadata[key].properties.dtype)
        ckpt.read([SliceRequest(key, (0,) * len(shape), out[key])])
    return out


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a torch_dist checkpoint by megatron-core's names (NeMo's
    checkpoints prefix them ``module.`` and hold the optimizer's states beside them)."""
    return {k.removeprefix("module."): t for k, t in read_all(path).items() if not k.startswith("optimizer.")}


def assert_same_tensors(a: Path, b: Path) -> int:
    ta, tb = model_tensors(a), model_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        assert torch.equal(ta[key], tb[key]), f"{key} differs"
    return len(ta)


def no_leftovers(output_dir: Path) -> bool:
    """Neither the output nor any of its staging folders exist."""
    parent = output_dir.parent
    return not output_dir.exists() and not any(p.name.startswith(output_dir.name + ".") for p in parent.iterdir()) \
        if parent.exists() else True
