"""megatron-core model configuration and construction for dense and upcycled models.

One function turns the Hydra config into a ``TransformerConfig``; another builds the
GPTModel chunk(s) this rank owns. The same code builds the dense model (``moe=dense``)
and the MoE model, so the two differ only where the upcycling says they should.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel
from nemo_upcycle.model.fused_paths import fused_paths_for_this_machine, transformer_engine_available
from nemo_upcycle.platform.device import gpu_available
from nemo_upcycle.model.rope_scaling import apply_rope_scaling
from nemo_upcycle.upcycle.spec import UpcycleSpec


def default_params_dtype() -> torch.dtype:
    return torch.bfloat16 if gpu_available() else torch.float32


def params_dtype_for(cfg: Any) -> torch.dtype:
    """The parameters' dtype ``trainer.precision`` asks for (a closed choice, checked with the
    configuration: config/checks/trainer.py); ``auto`` = bf16 on a GPU, fp32 on CPU. The
    model is built in it and the optimizer's mixed-precision settings (fp32 master weights,
    fp32 gradient reduction) follow it (training/job.py), so no spelling of the precision can
    give Adam bf16 states over bf16 weights."""
    from nemo_upcycle.config.checks.trainer import PARAMS_DTYPE_NAMES

    precision = cfg.trainer.precision
    return default_params_dtype() if precision == "auto" else getattr(torch, PARAMS_DTYPE_NAMES[precision])


def trains_in_bf16(cfg: Any) -> bool:
    """Whether the parameters are bf16: then (and only then) NeMo's bf16 mixed precision and
    megatron's fp32 master weights are on (training/job.py). Read from the dtype the model is
    built in, never from the spelling of ``trainer.precision``."""
    return params_dtype_for(cfg) == torch.bfloat16


def is_moe(cfg: Any) -> bool:
    return cfg.moe.num_experts > 0


def transformer_config_kwargs(
    cfg: Any, params_dtype: Optional[torch.dtype] = None, **overrides: Any
) -> dict:
    """Keyword arguments of the TransformerConfig of the Llama-style model in ``cfg``.

    Shared by :func:`build_transformer_config` and NeMo's GPTConfig (a TransformerConfig
    subclass), so both trainers build exactly the same model. The fused kernels are those
    this machine can run (nemo_upcycle.model.fused_paths); the loss's fusion is set by each
    caller (NeMo's config names it itself).
    """
    arch, moe, par = Architecture.of(cfg.model), cfg.moe, cfg.parallel
    params_dtype = params_dtype or params_dtype_for(cfg)
    on_gpu = gpu_available()
    fused = fused_paths_for_this_machine().model_kwargs()
    moe_only = ("moe_permute_fusion", "moe_grouped_gemm")
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sp,
        **interleaved_pipeline_p2p(par, on_gpu),
        init_method_std=0.02,
        **recompute_kwargs(cfg.trainer),
        **{name: on for name, on in fused.items() if name not in moe_only},
    )
    if is_moe(cfg):
        spec = UpcycleSpec.of(cfg)
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.topk,
            moe_ffn_hidden_size=spec.expert_ffn_hidden_size,
            moe_layer_freq=spec.layer_pattern(),
            expert_model_parallel_size=par.ep,
            expert_tensor_parallel_size=expert_tensor_parallel(par),
            moe_token_dispatcher_type=moe.token_dispatcher,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_token_drop_policy=moe.drop_policy,
            moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
            **{name: fused[name] for name in moe_only},
            **spec.router.megatron_settings(cfg.router),
        )
        if spec.has_shared_expert:
            # Run before the router, not overlapped with the dispatch (which only alltoall
            # on a GPU could do): one order of the sums whatever the layout.
            kwargs.update(moe_shared_expert_intermediate_size=spec.shared_ffn_hidden_size,
                          moe_shared_expert_overlap=False)
    kwargs.update(overrides)
    return kwargs


def recompute_kwargs(trainer: Any) -> dict:
    """megatron-core's activation recomputation fields for ``trainer.recompute`` (checked in
    config/checks/trainer.py): only in training, megatron-core never recomputes without grad."""
    if trainer.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(trainer.recompute_modules))
    if trainer.recompute == "full":
        return dict(recompute_granularity="full", recompute_method=trainer.recompute_method,
                    recompute_num_layers=trainer.recompute_num_layers)
    return {}


def interleaved_pipeline_p2p(par: Any, on_gpu: bool) -> dict:
    """How pipeline stages exchange tensors under the interleaved (virtual-stage) schedule.

    megatron-core's defaults (all sends and receives of a step in one batch) cross the
    activation and the gradient when the pipeline has two stages: the previous and the next
    stage are then the same rank, its two sends are matched with the two receives in
    posting order, and both tensors have the same shape, so nothing fails and training
    computes something else (Megatron-LM issues 750 and 1450; measured here: a PP2/VPP2
    step-1 loss differed from PP1's and PP2's in the third digit). Unbatched sends pair
    even and odd ranks explicitly. On a GPU they overlap with compute (Megatron-LM's own
    interleaved default); gloo's sends are not stream-ordered, so overlapping them with
    NeMo's freeing of sent activations (``deallocate_pipeline_outputs``) corrupts a
    microbatch now and then: on CPU each exchange completes before the step goes on.
    """
    if not par.vpp:
        return {}
    return {"overlap_p2p_comm": on_gpu, "batch_p2p_comm": False}


def build_transformer_config(cfg: Any, params_dtype: Optional[torch.dtype] = None, **overrides: Any):
    """TransformerConfig of the Llama-style model in ``cfg`` (dense or MoE), for running it
    with megatron-core directly (verify, evaluate, export, benchmarks)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    direct = dict(
        fused_paths_for_this_machine().loss_kwargs(),
        # Gradient-accumulation fusion writes into main_grad, which only megatron's DDP
        # wrapper (NeMo's trainer) allocates; models run here have none.
        gradient_accumulation_fusion=False,
    )
    return TransformerConfig(**transformer_config_kwargs(cfg, params_dtype, **{**direct, **overrides}))


# Where Transformer Engine is missing (CPU, the tests), this environment variable set to
# "transformer_engine" builds the local spec with the TE spec's checkpoint names (see
# local_spec_with_te_names): how the tests produce and read TE-named checkpoints without TE.
# An environment variable, not a configuration key: it reaches every torchrun worker, and
# it is no choice a user makes (with TE importable the TE spec is used whatever it says).
LAYER_NAMES_ENV = "NEMO_UPCYCLE_LAYER_NAMES"


def built_layer_naming() -> str:
    """The checkpoint naming of the models this process builds (nemo_upcycle.model.megatron_keys)."""
    from nemo_upcycle.model.megatron_keys import LOCAL_NAMES, TE_NAMES, check_layer_naming

    if transformer_engine_available():
        return TE_NAMES
    return check_layer_naming(os.environ.get(LAYER_NAMES_ENV) or LOCAL_NAMES, LAYER_NAMES_ENV)


def layer_spec(config, vp_stage: Optional[int] = None, shared_expert_gate: bool = False):
    """Decoder block spec: Transformer Engine when present, megatron-core local otherwise;
    with ``shared_expert_gate`` the MoE layers' shared experts gated (moe.shared_expert.gate)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from nemo_upcycle.model.megatron_keys import TE_NAMES

    te = transformer_engine_available()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage)
    if not te and built_layer_naming() == TE_NAMES:
        spec = local_spec_with_te_names(spec)
    if shared_expert_gate:
        spec = with_gated_shared_experts(spec)
    return spec


def shared_expert_gate_of(job: Any) -> bool:
    """moe.shared_expert.gate of a job configuration (a config saved before it existed: False)."""
    return bool(OmegaConf.select(OmegaConf.create(job) if isinstance(job, dict) else job,
                                 "moe.shared_expert.gate", default=False))


def with_gated_shared_experts(block_spec):
    """The block spec whose MoE layers build megatron-core's SharedExpertMLP with ``gate=True``.

    megatron-core 0.15.3 has no configuration field for the gate: its MoE module spec
    (``get_moe_module_spec_for_backend``) fixes ``params={"gate": False}``.
    """
    from dataclasses import replace

    from megatron.core.transformer.moe.moe_layer import MoELayer

    layers = []
    for layer in block_spec.layer_specs:
        mlp = layer.submodules.mlp
        if mlp.module is MoELayer and mlp.submodules.shared_experts is not None:
            shared = replace(mlp.submodules.shared_experts, params={**mlp.submodules.shared_experts.params, "gate": True})
            mlp = replace(mlp, submodules=replace(mlp.submodules, shared_experts=shared))
            layer = replace(layer, submodules=replace(layer.submodules, mlp=mlp))
        layers.append(layer)
    return replace(block_spec, layer_specs=layers)


def local_spec_with_te_names(block_spec):
    """The local block spec whose MoE layers save ``pre_mlp_layernorm`` under its own name.

    megatron-core's ``TransformerLayer.sharded_state_dict`` applies the layer spec's
    ``sharded_state_dict_keys_map``; without the local spec's ``pre_mlp_layernorm.`` entry an
    MoE layer's norm is saved as ``pre_mlp_layernorm.weight``, exactly as the TE spec saves it
    (the other keys are named alike by both specs). megatron-core writes the names, not us.
    """
    from dataclasses import replace

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from nemo_upcycle.model.megatron_keys import MOE_NORM_MODULE

    layers = []
    for layer in block_spec.layer_specs:
        if layer.submodules.mlp.module is MoELayer:
            keys_map = {k: v for k, v in layer.submodules.sharded_state_dict_keys_map.items() if k != MOE_NORM_MODULE}
            layer = replace(layer, submodules=replace(layer.submodules, sharded_state_dict_keys_map=keys_map))
        layers.append(layer)
    return replace(block_spec, layer_specs=layers)


def build_model_chunks(cfg: Any, config=None) -> list:
    """This rank's GPTModel chunk(s): one per virtual pipeline stage (one without VPP)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = config or build_transformer_config(cfg)
    arch = Architecture.of(cfg.model)
    vpp = cfg.parallel.vpp or 1
    chunks = []
    for vp_stage in range(vpp):
        vp = vp_stage if cfg.parallel.vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, vp, shared_expert_gate_of(cfg)),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rotary_base,
            vp_stage=vp,
        )
        apply_rope_scaling(chunk, arch)
        if gpu_available():
            # As megatron-core's own get_model (and NeMo's MegatronParallel) do: not every module
            # allocates on the GPU itself (megatron-core 0.15.3's shared-expert gate_weight is
            # created on the host whatever use_cpu_initialization says).
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks
