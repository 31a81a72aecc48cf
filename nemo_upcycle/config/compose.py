"""Compose the Hydra configuration from Python (tests, workers, notebooks)."""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from nemo_upcycle.config.schema import register_configs

# The YAML groups ship inside the package (package data), so an installed wheel finds them
# wherever it lives; NEMO_UPCYCLE_CONFIGS points every entry point at a copy of your own.
CONFIG_DIR = Path(os.environ.get("NEMO_UPCYCLE_CONFIGS") or str(files("nemo_upcycle") / "configs"))
CONFIG_NAME = "config"


def compose_config(overrides: Optional[Sequence[str]] = None) -> DictConfig:
    """The same configuration ``python -m nemo_upcycle.train <overrides>`` would see."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides or []))
