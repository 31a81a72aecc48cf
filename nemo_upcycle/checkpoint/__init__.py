"""Checkpoints, in the order the data flows: ``sources/`` reads a dense checkpoint slice by slice,
``hf/`` maps Hugging Face formats onto megatron-core, ``convert/`` imports and exports whole
checkpoints. Here: ``architecture`` (what a checkpoint states, in ``model.*`` names, shared by all
three) and the checkpoints training writes: found (``trained_checkpoint``), their stored job
configuration (``stored_config``) and loaded strictly into a model (``strict_load``)."""
