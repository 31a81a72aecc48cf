"""Loading a megatron-core checkpoint into this rank's model: names mapped, model weights strict.

megatron-core's loader, as NeMo is configured here (``ckpt_load_strictness="log_all"``), drops
every key the checkpoint lacks from the load and only logs it: the parameter keeps its initial
value and training goes on (a checkpoint of one layer spec resumed under the other left every
MoE norm at 1.0). So before model weights are loaded (resume, ``evaluate checkpoint=``):

1. every requested key, model weights and optimizer states alike, takes the checkpoint's
   spelling of the same tensor: the other layer spec's MoE norm name, NeMo's ``module.``
   prefix on one side only (:func:`nemo_upcycle.model.megatron_keys.checkpoint_spellings`);
2. the model weights all ranks ask for are compared with those the checkpoint holds
   (``_extra_state`` aside): any missing on either side refuses the load, naming the keys,
   before a byte is read. Every rank reaches the same verdict (the keys are gathered), so
   every rank exits 2 together.

Optimizer states stay under megatron's handling and :mod:`nemo_upcycle.training.optimizer_state`.
The export reads checkpoints by its own plan and checks both directions itself
(:func:`nemo_upcycle.checkpoint.convert.exporter.check_source_matches`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nemo_upcycle.errors import UserError
from nemo_upcycle.model.megatron_keys import (
    checkpoint_spellings,
    layer_naming_of_keys,
    model_key_mismatch,
    rename_sharded_keys,
    sharded_items,
)

log = logging.getLogger(__name__)


class CheckpointKeysMismatch(UserError):
    """The checkpoint does not hold exactly the model's weights, in any layer spec's naming."""


def checkpoint_keys(path: str | Path) -> list[str]:
    """Every key a torch_dist checkpoint (or NeMo 2's ``weights/``) stores, from its metadata."""
    from nemo_upcycle.checkpoint.sources.torch_dist import CheckpointFormatError, TorchDistCheckpoint

    try:
        return list(TorchDistCheckpoint(path).metadata.state_dict_metadata)
    except CheckpointFormatError as err:
        raise CheckpointKeysMismatch(str(err)) from None


def _on_every_rank(keys: set[str]) -> set[str]:
    """The union of ``keys`` over all ranks (pipeline stages hold different layers)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return set().union(*map(set, gathered))


def _recorded_naming(path: Path) -> str:
    from nemo_upcycle.checkpoint.sources.nemo2_context import stored_layer_naming

    root = path.parent if path.name == "weights" else path
    recorded = stored_layer_naming(root)
    return f", recorded in its context: {recorded}" if recorded else ""


def map_names_and_check(sharded_state: Any, model_state: Any, path: str | Path, what: str, advice: str) -> int:
    """Steps 1 and 2 of the module docstring, in place on ``sharded_state`` (``model_state``:
    its model-weight part, which may be all of it). Returns how many keys were renamed.

    ``what`` names the load in the error (``resume from <checkpoint>``), ``advice`` says what to do.
    """
    from nemo_upcycle.model.modeling import built_layer_naming

    stored = checkpoint_keys(path)
    renamed = rename_sharded_keys(sharded_state, checkpoint_spellings([i.key for i in sharded_items(sharded_state)],
                                                                       stored))
    mismatch = model_key_mismatch(_on_every_rank({i.key for i in sharded_items(model_state)}), stored)
    naming = (f"the checkpoint's layer naming: {layer_naming_of_keys(stored)}{_recorded_naming(Path(path))}; "
              f"this model's: {built_layer_naming()}")
    if mismatch:
        raise CheckpointKeysMismatch(
            f"{what}: the checkpoint does not hold the weights of the model this configuration builds "
            f"({naming}; names already mapped between the two):\n{mismatch.describe()}\n{advice}")
    if renamed:
        log.info("%s: %d keys mapped to the checkpoint's names (%s)", what, renamed, naming)
    return renamed
