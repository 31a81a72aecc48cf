"""Files and folders that readers never see half-written: write under a temporary name, then rename."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def refuse_existing(folder: str | Path, overwrite: bool, error: type[Exception]) -> None:
    """An output folder is replaced only when asked to (``overwrite=true``)."""
    if Path(folder).exists() and not overwrite:
        raise error(f"output_dir {folder} already exists; choose another or pass overwrite=true")


def write_folder_atomic(folder: str | Path, write: Callable[[Path], T]) -> T:
    """``write(staged)`` fills a folder beside ``folder``, which replaces ``folder`` only once
    complete: a failed or interrupted write never leaves a folder that looks finished, and
    leaves nothing behind. ``staged`` does not exist yet when ``write`` is called."""
    folder = Path(folder)
    staged = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)  # left by a process that was killed
    try:
        result = write(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    staged.rename(folder)
    return result
