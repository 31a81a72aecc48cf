"""A checkpoint the training job wrote, found from whatever folder the user names.

``export_hf checkpoint=...`` and ``evaluate checkpoint=...`` accept the checkpoint itself
(``<name>-last/``, its ``weights/``, any torch_dist folder) or the folder a run writes into
(``log_dir``, ``log_dir/upcycle``, ``log_dir/upcycle/checkpoints``): there the checkpoint a
relaunch of the training job would resume from is taken, by NeMo's own search (complete
``*-end``/``*-last`` checkpoints, unfinished ones skipped).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nemo_upcycle.errors import UserError

RUN_NAME = "upcycle"  # the training job's run folder in its log_dir (NeMo's logger name)


def checkpoint_dir(cfg: Any) -> Path:
    """Where the training job of ``cfg`` writes its checkpoints (and a relaunch resumes from)."""
    return Path(cfg.log_dir) / RUN_NAME / "checkpoints"


class TrainedCheckpointError(UserError):
    """No usable checkpoint where the user pointed; the message says what was looked for."""


@dataclass
class TrainedCheckpoint:
    root: Path  # the checkpoint folder (weights/ and context/ inside, for NeMo 2)
    weights: Path  # the torch_dist folder
    job: Optional[dict]  # the training job's configuration stored in the context, if any
    tokenizer: Optional[Path]  # the tokenizer folder NeMo copied into the context, if any


def _is_torch_dist(folder: Path) -> bool:
    return (folder / ".metadata").is_file()


def _checkpoints_folder(path: Path) -> Optional[Path]:
    """The ``checkpoints`` folder of a log_dir, a run folder, or that folder itself."""
    for candidate in (path / RUN_NAME / "checkpoints", path / "checkpoints", path):
        if candidate.is_dir() and any(p.is_dir() and _is_torch_dist(p / "weights") for p in candidate.iterdir()):
            return candidate
    return None


def latest_complete(checkpoints: Path) -> Path:
    """The checkpoint NeMo's AutoResume resumes from in ``checkpoints`` (what a relaunch would train on)."""
    from nemo.lightning import AutoResume

    resume = AutoResume(resume_from_directory=str(checkpoints), resume_if_exists=True,
                        resume_ignore_no_checkpoint=True)
    try:
        found = resume._find_trainer_ckpt_path()
    except ValueError as err:  # e.g. only an unfinished last checkpoint
        raise TrainedCheckpointError(f"{checkpoints}: {err}") from None
    if found is None:
        raise TrainedCheckpointError(
            f"{checkpoints} holds no complete checkpoint (*-last or *-end without its -unfinished "
            "marker); name one checkpoint folder instead")
    return Path(found)


def find_checkpoint(path: str | Path) -> TrainedCheckpoint:
    """The checkpoint ``path`` names, with what its context states; only metadata is read."""
    from nemo_upcycle.checkpoint.sources.nemo2_context import context_tokenizer, stored_job

    path = Path(path)
    if not path.exists():
        raise TrainedCheckpointError(f"checkpoint={path} does not exist")
    if _is_torch_dist(path / "weights"):
        root, weights = path, path / "weights"
    elif _is_torch_dist(path):
        # NeMo 2's weights/ named directly: its context lies beside it.
        root = path.parent if (path.name == "weights" and (path.parent / "context").is_dir()) else path
        weights = path
    else:
        checkpoints = _checkpoints_folder(path)
        if checkpoints is None:
            raise TrainedCheckpointError(
                f"checkpoint={path} is neither a checkpoint (a torch_dist folder with .metadata, or a NeMo 2 "
                f"checkpoint with weights/) nor a training log_dir holding {RUN_NAME}/checkpoints/")
        root = latest_complete(checkpoints)
        weights = root / "weights"
    return TrainedCheckpoint(root=root, weights=weights, job=stored_job(root), tokenizer=context_tokenizer(root))
