"""NeMo 2 model configuration whose ``configure_model`` runs our model provider.

``UpcycleGPTConfig`` is NeMo's ``GPTConfig`` (a megatron TransformerConfig) with the same
fields :func:`nemo_upcycle.model.modeling.transformer_config_kwargs` gives megatron-core
directly, plus two of its own: the job configuration (plain data, so NeMo can serialise it
into the checkpoint's context) and the dense checkpoint to upcycle from (None on resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from nemo.collections.llm.gpt.model.base import GPTConfig
from omegaconf import OmegaConf

from nemo_upcycle.model.fused_paths import fused_paths_for_this_machine
from nemo_upcycle.model.modeling import layer_spec, transformer_config_kwargs
from nemo_upcycle.model.rope_scaling import apply_rope_scaling


def upcycle_layer_spec(config: "UpcycleGPTConfig", vp_stage: Optional[int] = None):
    """Transformer Engine spec when present, megatron-core local spec on CPU.

    Not dead: NeMo records this callable by its import path in every checkpoint's context
    (``context/io.json``), so resuming or loading a saved run needs this name to exist.
    """
    return layer_spec(config, vp_stage)


@dataclass
class UpcycleGPTConfig(GPTConfig):
    job: Optional[dict] = None
    upcycle_from: Optional[str] = None

    def configure_model(self, tokenizer, pre_process=None, post_process=None, vp_stage=None):
        from nemo_upcycle.training.provider import upcycle_chunk

        model = super().configure_model(tokenizer, pre_process, post_process, vp_stage)
        job = OmegaConf.create(self.job)
        apply_rope_scaling(model, job.model)  # on resume too: the frequencies are not saved
        upcycle_chunk(model, job, self.upcycle_from)
        return model


def make_gpt_config(cfg: Any, upcycle_from: Optional[str]) -> UpcycleGPTConfig:
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
    )
