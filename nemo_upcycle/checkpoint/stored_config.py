"""A trained checkpoint's own configuration, in place of the command line's defaults.

The training job stores its whole resolved configuration in every checkpoint
(``context/model.yaml``: ``UpcycleGPTConfig.job``). What the checkpoint *is* (``model``,
``moe``, ``router``) is taken from there, so ``export_hf checkpoint=X output_dir=Y`` and
``evaluate checkpoint=X`` need no other option. How the command runs (``parallel``,
``eval``, ``export``, ``cache_dir``, ...) stays the command line's: a distributed checkpoint
loads at any layout.

An override on the command line that contradicts the checkpoint is refused rather than
ignored: ``moe=e16t4`` against an E8T2 checkpoint is a mistake (the wrong checkpoint, or the
wrong expectation), and silently exporting E8T2 would hide it. One that agrees is accepted.
"""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import MISSING, OmegaConf

from nemo_upcycle.errors import UserError

# section -> the key its config group option sets (``moe=e8t2`` means ``moe.name=e8t2``)
STATED = {"model": "name", "moe": "name", "router": "type"}
# Where files lie on this machine: the command line may point elsewhere than the training job did.
LOCATIONS = ("model.dense_checkpoint", "model.tokenizer")


class StoredConfigConflict(UserError):
    """The command line contradicts the configuration the checkpoint was trained with."""


def explicit_overrides() -> list[str]:
    """The overrides typed on this command line (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def overridden_keys(overrides: Sequence[str]) -> list[str]:
    """``moe.topk=4`` -> ``moe.topk``; ``+a.b=1``, ``~a.b`` -> ``a.b``; ``moe=e16t4`` -> ``moe``."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").strip()
        keys.append(key.split("@", 1)[0])  # a group's package suffix: moe@x=...
    return keys


def _select(node: Any, path: str) -> Any:
    value = OmegaConf.select(OmegaConf.create(node) if isinstance(node, dict) else node, path,
                             throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def conflicts(cfg: Any, job: dict, overrides: Sequence[str]) -> list[str]:
    """Each command-line override of ``model``/``moe``/``router`` that disagrees with ``job``."""
    problems = []
    for key in dict.fromkeys(overridden_keys(overrides)):
        section = key.split(".", 1)[0]
        if section not in STATED or key in LOCATIONS:
            continue
        path = f"{section}.{STATED[section]}" if key == section else key
        given, trained = _select(cfg, path), _select(job, path)
        if key == section and given is None:  # model=auto states nothing: the checkpoint says what it is
            continue
        if given != trained:
            problems.append(f"{key}: the command line gives {path}={given!r}, the checkpoint was trained "
                            f"with {path}={trained!r}")
    return problems


def apply_stored_job(cfg: Any, checkpoint, overrides: Sequence[str], argument: str = "checkpoint") -> None:
    """Set ``cfg.model``/``moe``/``router`` to what ``checkpoint`` (a TrainedCheckpoint) was trained with.

    A checkpoint without a stored job (written by another tool) leaves ``cfg`` as it is:
    its configuration then comes from the command line, as before.
    """
    job = checkpoint.job
    if job is None:
        return
    problems = conflicts(cfg, job, overrides)
    if problems:
        raise StoredConfigConflict(
            f"{argument}={checkpoint.root} was trained with another configuration than the command line "
            "states:\n" + "\n".join(f"  - {p}" for p in problems)
            + f"\nDrop these overrides: model, moe and router are read from the checkpoint "
              f"({checkpoint.root / 'context' / 'model.yaml'}, the training job's configuration).")
    explicit = set(overridden_keys(overrides))
    kept = {key: OmegaConf.select(cfg, key) for key in LOCATIONS if key in explicit}
    for section in STATED:
        if section in job:
            try:  # merged into the typed schema: a value of the wrong type is caught here
                OmegaConf.update(cfg, section, job[section], merge=True)
            except (ValueError, KeyError, AttributeError) as err:  # omegaconf's errors derive from these
                raise StoredConfigConflict(
                    f"{argument}={checkpoint.root}: its stored {section} configuration does not fit this "
                    f"version of nemo-upcycle ({err}); export or evaluate it with the version that trained it"
                ) from None
    # A trained checkpoint is read on its own: the dense model it was upcycled from is not
    # needed (nor, on another machine, there); the tokenizer travels in its context.
    cfg.model.dense_checkpoint = MISSING
    if checkpoint.tokenizer is not None:
        cfg.model.tokenizer = str(checkpoint.tokenizer)
    for key, value in kept.items():
        OmegaConf.update(cfg, key, value)
