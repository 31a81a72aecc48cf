"""NeMo 2 model configuration whose ``configure_model`` runs our model provider.

``UpcycleGPTConfig`` is NeMo's ``GPTConfig`` (a megatron TransformerConfig) with the same
fields :func:`nemo_upcycle.model.modeling.transformer_config_kwargs` gives megatron-core
directly, plus two of its own: the job configuration (plain data, so NeMo can serialise it
into the checkpoint's context) and the dense checkpoint to upcycle from (None on resume,
and never written into a checkpoint: a trained checkpoint stands alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from nemo.collections.llm.gpt.model.base import GPTConfig
from omegaconf import OmegaConf

from nemo_upcycle.model.fused_paths import fused_paths_for_this_machine
from nemo_upcycle.model.modeling import built_layer_naming, layer_spec, shared_expert_gate_of, transformer_config_kwargs
from nemo_upcycle.model.rope_scaling import apply_rope_scaling


def upcycle_layer_spec(config: "UpcycleGPTConfig", vp_stage: Optional[int] = None):
    """Transformer Engine spec when present, megatron-core local spec on CPU.

    Not dead: NeMo records this callable by its import path in every checkpoint's context
    (``context/io.json``), so resuming or loading a saved run needs this name to exist.
    """
    return layer_spec(config, vp_stage, shared_expert_gate_of(config.job or {}))


# Constructor arguments of the first launch that NeMo must not record in a checkpoint's
# context: the dense checkpoint consumed by upcycling, and megatron's random initialisation
# skipped for it. What the context rebuilds (our resume, ``nemo.lightning.io.load_context``
# and a restore, a fine-tune, an export) is the trained model, whose weights then load from
# the checkpoint; with the path recorded it would upcycle again, or fail once the dense
# checkpoint has moved.
FIRST_LAUNCH_ONLY = ("upcycle_from", "perform_initialization")

# The dense checkpoint this process's launch upcycles from (make_gpt_config sets it; None on a
# resume and in any other process). NeMo builds virtual-pipeline chunks 1..VPP-1 by
# ``io.reinit`` of chunk 0, i.e. from the recorded arguments, which leave ``upcycle_from`` out:
# without this those chunks were built randomly initialised and never upcycled.
_launch_upcycles_from: Optional[str] = None


@dataclass
class UpcycleGPTConfig(GPTConfig):
    job: Optional[dict] = None
    upcycle_from: Optional[str] = None
    # The layer spec's checkpoint naming the model is built with (nemo_upcycle.model.megatron_keys:
    # "local" or "transformer_engine"), recorded in every checkpoint's context/model.yaml. None:
    # a checkpoint saved before it was recorded (its keys tell: megatron_keys.layer_naming_of_keys).
    layer_naming: Optional[str] = None

    def io_transform_args(self, init_fn, *args, **kwargs):
        captured = super().io_transform_args(init_fn, *args, **kwargs)
        for name in FIRST_LAUNCH_ONLY:
            captured.pop(name, None)  # the dataclass default (None, True) when the context is rebuilt
        return captured

    def configure_model(self, tokenizer, pre_process=None, post_process=None, vp_stage=None):
        from nemo_upcycle.training.provider import upcycle_chunk

        upcycle_from = self.upcycle_from or _launch_upcycles_from
        if upcycle_from is not None:
            self.perform_initialization = False  # a chunk rebuilt by io.reinit: see make_gpt_config
        model = super().configure_model(tokenizer, pre_process, post_process, vp_stage)
        job = OmegaConf.create(self.job)
        apply_rope_scaling(model, job.model)  # on resume too: the frequencies are not saved
        upcycle_chunk(model, job, upcycle_from)
        return model


def make_gpt_config(cfg: Any, upcycle_from: Optional[str]) -> UpcycleGPTConfig:
    global _launch_upcycles_from
    _launch_upcycles_from = upcycle_from
    kwargs = transformer_config_kwargs(cfg)
    # Upcycling writes every parameter (the engine checks), so megatron's random init would
    # be thrown away: skipping it saves most of the model's construction time and the
    # full-size master weights it allocates per tensor-parallel weight.
    kwargs["perform_initialization"] = upcycle_from is None
    # The trainer, not the model, owns pipeline parallel sizes in NeMo's strategy; keep both
    # consistent by passing the same values.
    return UpcycleGPTConfig(
        **kwargs,
        vocab_size=cfg.model.vocab_size,
        make_vocab_size_divisible_by=1,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        seq_length=cfg.trainer.seq_length,
        # The loss's fusion (off on CPU; TE's or megatron's fused cross entropy on a GPU).
        **fused_paths_for_this_machine().loss_kwargs(),
        transformer_layer_spec=upcycle_layer_spec,
        job=OmegaConf.to_container(cfg, resolve=True),
        upcycle_from=upcycle_from,
        layer_naming=built_layer_naming(),
    )
