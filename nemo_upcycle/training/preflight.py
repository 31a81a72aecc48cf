"""Checks of the training job's output location and data, run before any weight is read.

A job that cannot write its checkpoints should fail in seconds with the reason, not after
hours of training when the first save fails (or, worse, leaves a half-written checkpoint on
a full disk). Two things are checked, without creating anything:

* ``log_dir`` is writable (or creatable): a probe file in the nearest existing folder;
* the disk holding it has room for the MoE checkpoints this run will keep, estimated from
  the planner's exact parameter count;

and that the data can feed the run: its tokens and the epochs the run makes of them are
printed, and a run that would repeat its data more than a few times is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.errors import UpcycleError


class PreflightError(UpcycleError):
    """The job's output location cannot hold what the job will write."""


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a later mkdir -p starts from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_log_dir_writable(log_dir: str | Path) -> None:
    log_dir = Path(log_dir)
    base = nearest_existing(log_dir)
    if not base.is_dir():
        raise PreflightError(
            f"log_dir={log_dir} cannot be created: {base} is a file, not a folder; "
            "choose another log_dir"
        )
    try:
        # A real write, not os.access: permission bits say nothing about read-only mounts,
        # quotas or ACLs. The probe is removed at once, so a refused run leaves no file.
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PreflightError(
            f"log_dir={log_dir} is not writable: creating a file in {base} failed "
            f"({err.strerror or err}); choose a writable log_dir or fix the folder's permissions"
        ) from None


# -- disk space ------------------------------------------------------------------------


def checkpoint_weight_bytes(cfg: Any) -> int:
    """Bytes of one MoE checkpoint's tensors: weights, Adam's two moments, fp32 master copy.

    Every parameter is stored once across all ranks (distributed checkpoints hold no
    replicas), in the training dtype, plus 8 bytes of Adam moments and, for 16-bit weights,
    a 4-byte fp32 master copy: 12 bytes per parameter on CPU (fp32), 14 with bf16. The
    distributed optimizer saves its fp32 main params even for fp32 weights (fully reshardable
    format, ``training/job.py``): 16 bytes with fp32.
    """
    from nemo_upcycle.model.modeling import trains_in_bf16
    from nemo_upcycle.planner.memory import Precision
    from nemo_upcycle.planner.params import model_params

    precision = Precision(param_bytes=2 if trains_in_bf16(cfg) else 4)
    fp32_main_copy = 4 if cfg.trainer.distributed_optimizer and not trains_in_bf16(cfg) else 0
    return model_params(cfg).total * (precision.param_bytes + precision.optimizer_bytes + fp32_main_copy)


def folder_bytes(path: Optional[Path]) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes(cfg: Any) -> int:
    """Estimated size of one ``-last`` checkpoint as NeMo writes it.

    NeMo's ``context/`` copies the whole tokenizer folder into every checkpoint (for the
    embedded SmolLM2 that folder also holds the 538 MB dense safetensors), so it counts too.
    """
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_files, tokenizer_folder

    # NeMo is handed the tokenizer files alone (nemo_upcycle.checkpoint.hf.tokenizer_files).
    tokenizer = sum(f.stat().st_size for f in tokenizer_files(tokenizer_folder(cfg, import_embedded=False)))
    return checkpoint_weight_bytes(cfg) + tokenizer


def checkpoints_on_disk_at_peak(trainer: Any) -> int:
    """How many checkpoints exist at once: NeMo writes the new ``-last`` before deleting the
    previous one, so two as soon as the run saves more than once; none if it never saves."""
    every = trainer.checkpoint_every_n_steps
    if every <= 0:
        return 0
    return 1 if trainer.max_steps <= every else 2


def check_disk_space(cfg: Any) -> None:
    from nemo_upcycle.checkpoint.trained_checkpoint import checkpoint_dir

    copies = checkpoints_on_disk_at_peak(cfg.trainer)
    if copies == 0:
        return
    one = checkpoint_bytes(cfg)
    # What is already there (the checkpoint a relaunch resumes from, unfinished ones NeMo
    # deletes at start) is space the run reuses.
    existing = folder_bytes(checkpoint_dir(cfg))
    needed = copies * one - existing
    base = nearest_existing(Path(cfg.log_dir))
    free = shutil.disk_usage(base).free
    if needed > free:
        raise PreflightError(
            f"not enough disk space for the checkpoints in log_dir={cfg.log_dir}: one MoE checkpoint "
            f"is about {_gb(one)} (weights and Adam's states of {_params(cfg)} parameters, plus the "
            f"tokenizer folder NeMo copies into it); NeMo writes the next -last checkpoint before "
            f"deleting the previous one, so this run needs {_gb(needed)} free, and {base} has "
            f"{_gb(free)}. Free some space, point log_dir at a larger disk, or set "
            "trainer.checkpoint_every_n_steps=0 to save no checkpoint"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB ({n:,} bytes)"


def _params(cfg: Any) -> str:
    from nemo_upcycle.planner.params import model_params

    return f"{model_params(cfg).total:,}"


def check_tokenizer(cfg: Any) -> None:
    from omegaconf import OmegaConf

    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder

    if tokenizer_folder(cfg, import_embedded=False) is None:
        # A relaunch's dense_checkpoint is MISSING (the trained checkpoint stands alone): select, not read.
        dense = OmegaConf.select(cfg, "model.dense_checkpoint", default=None)
        beside = f"beside model.dense_checkpoint={dense}" if dense else "in the checkpoint's context"
        raise PreflightError(
            f"training needs a tokenizer and none lies {beside}: "
            "set model.tokenizer=<a Hugging Face tokenizer folder>"
        )


def check_data(cfg: Any) -> list:
    """Tokenize the data if it is not yet (rank 0, into the cache), state its tokens and the
    epochs this run makes of it, and refuse more than a few (nemo_upcycle/data/epochs.py).
    Returns the blend list the job trains on."""
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder
    from nemo_upcycle.data.epochs import check_repeats, data_budget, describe
    from nemo_upcycle.data.prepare import resolve_data_paths
    from nemo_upcycle.platform.launcher_env import print_rank0

    paths = resolve_data_paths(cfg, tokenizer_folder(cfg))
    budget = data_budget(cfg, paths)
    print_rank0(describe(cfg, budget))
    check_repeats(cfg, budget)
    return paths


def check_before_training(cfg: Any) -> None:
    """Every check of what the job needs besides the dense weights, in the order a user would fix them."""
    check_log_dir_writable(cfg.log_dir)
    check_disk_space(cfg)
    check_tokenizer(cfg)
    check_data(cfg)
