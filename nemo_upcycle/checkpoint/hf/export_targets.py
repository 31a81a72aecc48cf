"""Which Hugging Face architecture computes a trained configuration exactly, or why none does.

Every target is one row of :data:`TARGETS`: its class and model_type, what it holds exactly,
its MoE tensor names (hf/moe_layouts.py), its config.json keys and, for an MoE target, how
``import_dense`` reads its folders back (hf/read_back.py does the rest for every target).
A target is exact for a configuration when transformers' own code (no custom code) computes
what megatron-core computes in eval mode on the same weights: the attention (plain, q/k/v
biases or q/k norms), the routing function, which layers are MoE layers, and no token ever
dropped, and the shared expert where the model has one (hf/moe_layouts.py: Qwen2-MoE holds
a gated or an ungated one, GLM-4-MoE an ungated one, Mixtral and Qwen3-MoE none).
``export.architecture=auto`` takes the first exact target in :data:`AUTO_ORDER`;
a name asks for that one and is refused, with the reasons, when it is not exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Optional

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.checkpoint.hf.moe_layouts import GATED, MoeFolderError, MoeLayout, MoeReadBack, shared_expert_kind
from nemo_upcycle.errors import UserError
from nemo_upcycle.upcycle.routers import ROUTINGS, router_computing
from nemo_upcycle.upcycle.spec import UpcycleSpec


class ExportError(UserError):
    """The checkpoint or configuration cannot be exported; the message says why and what to do."""


ATTENTION_WORDS = {"llama": "plain attention", "mistral": "plain attention", "qwen2": "q/k/v biases",
                   "qwen3": "q/k norms"}


# A target's config.json keys beyond the common ones (checkpoint/hf/config_json.py adds those).
ConfigKeys = Callable[[Any, Architecture, UpcycleSpec], dict]
# An MoE target's config.json read back: (the dense family's config.json to state the
# architecture from, the MoE settings before read_back.py works out granularity and shared expert).
ReadBack = Callable[[dict, str], tuple[dict, MoeReadBack]]


def _no_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return {}


@dataclass(frozen=True)
class ExportTarget:
    """Everything about one Hugging Face architecture nemo-upcycle writes (and reads back)."""

    name: str  # the value of export.architecture
    architecture: str  # the class transformers builds
    model_type: str
    families: tuple[str, ...]  # dense families whose attention it holds exactly
    routings: tuple[str, ...] = ()  # routings it computes (upcycle/routers.py ROUTINGS); () = a dense model
    # Which layers may keep a dense FFN: "none", "any" (Qwen's mlp_only_layers) or "first"
    # (GLM-4-MoE's first_k_dense_replace: layers 0..k-1).
    dense_layers: str = "none"
    head_dim_free: bool = True  # head_dim may differ from hidden_size / heads (Qwen2-MoE refuses it)
    layout: Optional[MoeLayout] = None  # an MoE target's tensor names and shared expert (hf/moe_layouts.py)
    config_keys: ConfigKeys = _no_keys
    read_back: Optional[ReadBack] = None  # an MoE target's folders, read back by import_dense

    @property
    def is_moe(self) -> bool:
        return bool(self.routings)


# --- config.json keys and read-back of each target ---------------------------------------------

def _aux_loss(cfg: Any) -> float:
    return float(cfg.router.aux_loss_coeff or 0.0)


def _mixtral_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(intermediate_size=spec.expert_ffn_hidden_size, num_local_experts=spec.num_experts,
                num_experts_per_tok=spec.topk, output_router_logits=False, router_aux_loss_coef=_aux_loss(cfg),
                router_jitter_noise=0.0, sliding_window=None)


def _mixtral_read(config: dict, where: str) -> tuple[dict, MoeReadBack]:
    layers = int(config["num_hidden_layers"])
    experts, width = int(config.get("num_local_experts", 0) or 0), int(config["intermediate_size"])
    moe = MoeReadBack(experts, int(config.get("num_experts_per_tok", 2) or 2), list(range(layers)), width, width)
    return dict(config, model_type="llama"), moe


def _qwen_moe_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    routing = spec.router.routing_at_inference(spec.topk)
    return dict(
        moe_intermediate_size=spec.expert_ffn_hidden_size, num_experts=spec.num_experts,
        num_experts_per_tok=spec.topk, norm_topk_prob=routing == "topk_softmax",
        # Every layer is an MoE layer unless listed: decoder_sparse_step=1 and mlp_only_layers.
        decoder_sparse_step=1,
        mlp_only_layers=sorted(set(range(arch.num_layers)) - set(spec.moe_layers)),
        output_router_logits=False, router_aux_loss_coef=_aux_loss(cfg),
        use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers,
    )


def _qwen2_moe_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    # The shared expert Qwen2-MoE always runs: the model's, or written inert (hf/moe_layouts.py).
    return dict(_qwen_moe_keys(cfg, arch, spec), qkv_bias=arch.qkv_bias,
                shared_expert_intermediate_size=QWEN2_MOE.hf_shared_width(spec))


def _qwen3_moe_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(_qwen_moe_keys(cfg, arch, spec), attention_bias=False)


def _qwen_moe_layers(config: dict, layers: int, experts: int) -> list[int]:
    """transformers' rule (Qwen2MoeDecoderLayer): MoE unless in mlp_only_layers, every decoder_sparse_step-th."""
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    return [i for i in range(layers) if experts > 0 and i not in dense and (i + 1) % step == 0]


def _qwen_moe_read(config: dict, where: str) -> tuple[dict, MoeReadBack]:
    layers, experts = int(config["num_hidden_layers"]), int(config.get("num_experts", 0) or 0)
    if config["model_type"] == "qwen2_moe":
        # Written for a Llama with qkv_bias=false; transformers' default is the Qwen2 attention.
        family = "qwen2" if config.get("qkv_bias", True) else "llama"
    else:
        family = "qwen3"
    routing = "topk_softmax" if config.get("norm_topk_prob") else "softmax_topk"
    moe = MoeReadBack(experts, int(config["num_experts_per_tok"]), _qwen_moe_layers(config, layers, experts),
                      int(config["moe_intermediate_size"]), int(config["intermediate_size"]),
                      router=router_computing(routing), layout=config["model_type"],
                      shared_expert_width=int(config.get("shared_expert_intermediate_size") or 0))
    return dict(config, model_type=family), moe


def _glm4_moe_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(
        n_routed_experts=spec.num_experts, num_experts_per_tok=spec.topk,
        moe_intermediate_size=spec.expert_ffn_hidden_size,
        # Layers 0..k-1 dense, the rest MoE (target_problems checked that moe.layers is so).
        first_k_dense_replace=arch.num_layers - len(spec.moe_layers),
        # Shared experts of the routed width F/G: the model's (copy: G of them, slices: S), or
        # one written inert (hf/moe_layouts.py).
        n_shared_experts=GLM4_MOE.hf_shared_width(spec) // spec.expert_ffn_hidden_size,
        # One group holding every expert: the group-limited choice is a plain top-k.
        n_group=1, topk_group=1,
        # megatron-core renormalises the chosen sigmoid scores only when k > 1, and scales by nothing.
        norm_topk_prob=spec.topk > 1, routed_scaling_factor=1.0,
        partial_rotary_factor=1.0, attention_bias=arch.qkv_bias, use_qk_norm=arch.qk_layernorm,
        output_router_logits=False,
    )


def _glm4_moe_read(config: dict, where: str) -> tuple[dict, MoeReadBack]:
    """GLM-4-MoE as nemo-upcycle writes it: megatron-core's sigmoid router with an expert bias."""
    layers, experts, topk = int(config["num_hidden_layers"]), int(config["n_routed_experts"]), int(config["num_experts_per_tok"])
    router = router_computing("sigmoid_bias")
    problems = [f"{k}={config.get(k)} (megatron-core's router here computes {v})" for k, v in
                (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0), ("norm_topk_prob", topk > 1))
                if config.get(k) != v]
    if problems:
        raise MoeFolderError(f"{where}: a GLM-4-MoE routing megatron-core's {router} router does not compute: "
                             + "; ".join(problems))
    width, k = int(config["moe_intermediate_size"]), int(config.get("first_k_dense_replace", 0) or 0)
    moe = MoeReadBack(experts, topk, list(range(k, layers)), width, int(config["intermediate_size"]),
                      router=router, layout="glm4_moe",
                      shared_expert_width=width * int(config.get("n_shared_experts", 0) or 0))
    # attention_bias is on q/k/v only (Qwen2's), use_qk_norm is Qwen3's q/k norm: the family says them.
    family = "qwen3" if config.get("use_qk_norm") else "qwen2" if config.get("attention_bias") else "llama"
    return {k: v for k, v in config.items() if k != "attention_bias"} | {"model_type": family}, moe


def _llama_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(attention_bias=False, mlp_bias=False)


def _qwen_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)


def _qwen3_keys(cfg: Any, arch: Architecture, spec: UpcycleSpec) -> dict:
    return dict(attention_bias=False, **_qwen_keys(cfg, arch, spec))


QWEN2_MOE = MoeLayout("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj", shared="shared_expert",
                      shared_gate="shared_expert_gate")
GLM4_MOE = MoeLayout("glm4_moe", "mlp", "gate_proj", "up_proj", "down_proj", shared="shared_experts",
                     shared_in_routed_widths=True, router_bias="e_score_correction_bias")

# --- the table: adding a target is adding a row (in export.architecture=auto's order) -----------

TARGETS = {t.name: t for t in (
    # Mixtral: softmax over all experts, top-k, renormalised = softmax over the k chosen logits.
    ExportTarget("mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), ("topk_softmax",),
                 layout=MoeLayout("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
                 config_keys=_mixtral_keys, read_back=_mixtral_read),
    # Qwen2-MoE: softmax, top-k, renormalised only with norm_topk_prob. Softmax over all then
    # renormalising the k chosen is exp(l_i) / sum_{j chosen} exp(l_j), megatron's top-k then
    # softmax; the chosen experts agree because softmax keeps the order of the logits.
    # qkv_bias switches its q/k/v biases off for a Llama. Its shared expert holds the model's,
    # gated or ungated (gate fixed at zero, down_proj x2), or is written inert.
    ExportTarget("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"),
                 ("topk_softmax", "softmax_topk"), dense_layers="any", head_dim_free=False,
                 layout=QWEN2_MOE, config_keys=_qwen2_moe_keys, read_back=_qwen_moe_read),
    # Qwen3-MoE: the same routing, no shared expert, q/k norms always on (a Qwen3 attention).
    ExportTarget("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",),
                 ("topk_softmax", "softmax_topk"), dense_layers="any",
                 layout=MoeLayout("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj"),
                 config_keys=_qwen3_moe_keys, read_back=_qwen_moe_read),
    # GLM-4-MoE (Glm4MoeTopkRouter): sigmoid scores, e_score_correction_bias added for the
    # choice only, the chosen scores renormalised (+1e-20, as megatron-core) when
    # norm_topk_prob, times routed_scaling_factor (1.0); with n_group = topk_group = 1 its
    # group-limited choice is a plain top-k. Its attention is a Llama's with
    # partial_rotary_factor=1.0 (rotate_half RoPE over the whole head), q/k/v biases by
    # attention_bias (no o_proj bias: Qwen2's) and q/k norms by use_qk_norm (Qwen3's, before
    # RoPE). Its ungated shared experts (n_shared_experts x the routed width) hold the model's
    # ungated one (copy: G slices wide, slices: S) or are written inert.
    ExportTarget("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe", ("llama", "mistral", "qwen2", "qwen3"),
                 ("sigmoid_bias",), dense_layers="first", layout=GLM4_MOE, config_keys=_glm4_moe_keys,
                 read_back=_glm4_moe_read),
    ExportTarget("llama", "LlamaForCausalLM", "llama", ("llama", "mistral"), config_keys=_llama_keys),
    ExportTarget("qwen2", "Qwen2ForCausalLM", "qwen2", ("qwen2",), config_keys=_qwen_keys),
    ExportTarget("qwen3", "Qwen3ForCausalLM", "qwen3", ("qwen3",), config_keys=_qwen3_keys),
)}
AUTO_ORDER = tuple(TARGETS)
# The MoE targets by model_type: how a folder of that type is named and read back.
MOE_TARGETS = {t.model_type: t for t in TARGETS.values() if t.is_moe}


def moe_layout(model_type: Optional[str]) -> MoeLayout:
    """The MoE tensor names of an MoE ``model_type`` nemo-upcycle writes (None: Mixtral's)."""
    return MOE_TARGETS[model_type or "mixtral"].layout
# Checked for sigmoid routing and found not exact.
SIGMOID_FORMATS_CHECKED = (
    "DeepSeek-V3 (deepseek_v3) computes sigmoid routing with a bias but its attention is multi-head "
    "latent attention (a shared RoPE key, an RMSNorm inside the key/value projection), which cannot "
    "hold a Llama/Qwen attention",
)


def _export_option(cfg: Any, name: str, default: Any) -> Any:
    export = getattr(cfg, "export", None)
    return getattr(export, name, default) if export is not None else default


def target_problems(target: ExportTarget, cfg: Any) -> list[str]:
    """Why ``target`` would compute something else than this configuration (empty: it is exact)."""
    arch, moe = Architecture.of(cfg.model), cfg.moe
    family = arch.family
    problems = []
    if family not in target.families:
        problems.append(f"model.family={family} has {ATTENTION_WORDS.get(family, 'its own attention')}; "
                        f"{target.architecture}'s attention holds {'/'.join(target.families)} models")
    if not target.is_moe or moe.num_experts == 0:
        if target.is_moe != (moe.num_experts > 0):
            problems.append(f"{target.architecture} is {'an MoE' if target.is_moe else 'a dense'} model, "
                            f"moe={moe.name} is {'an MoE' if moe.num_experts else 'dense'}")
        return problems
    spec = UpcycleSpec.of(cfg)
    routing = spec.router.routing_at_inference(spec.topk)
    if routing not in target.routings:
        problems.append(f"router.type={cfg.router.type} with top-{spec.topk} computes {ROUTINGS[routing]} "
                        f"at inference; {target.architecture} computes "
                        + " or ".join(ROUTINGS[r] for r in target.routings))
    dense = sorted(set(range(arch.num_layers)) - set(spec.moe_layers))
    if dense and target.dense_layers == "none":
        problems.append(f"moe.layers={moe.layers} leaves layers {dense} dense; "
                        f"{target.architecture} has an MoE FFN in every layer")
    if dense and target.dense_layers == "first" and dense != list(range(len(dense))):
        problems.append(f"moe.layers={moe.layers} leaves layers {dense} dense; {target.architecture} "
                        "keeps only its first layers dense (first_k_dense_replace)")
    problems += shared_expert_problems(target, spec)
    if not target.head_dim_free and arch.head_dim * arch.num_attention_heads != arch.hidden_size:
        problems.append(f"model.head_dim={arch.head_dim} x {arch.num_attention_heads} heads != "
                        f"hidden_size={arch.hidden_size}; {target.architecture} requires them equal")
    return problems


def shared_expert_problems(target: ExportTarget, spec: UpcycleSpec) -> list[str]:
    """Why ``target``'s MoE layers cannot hold the model's shared expert (empty: they can)."""
    kind = shared_expert_kind(spec)
    lay = target.layout
    if lay.holds(kind):
        return []
    holders = " and ".join(t.architecture for t in MOE_TARGETS.values() if t.layout.holds(kind))
    if kind == GATED and lay.shared:
        return [f"moe.shared_expert.gate=true puts a sigmoid gate on the shared expert; {target.architecture}'s "
                f"shared experts are ungated ({holders} holds a gated one; for {target.architecture} train with "
                "moe.shared_expert.gate=false)"]
    return [f"moe.shared_expert.mode={spec.shared_mode} adds a shared expert every token runs; "
            f"{target.architecture} has none (a {kind} one is held by {holders})"]


def dropped_tokens(cfg: Any) -> Optional[str]:
    """Why this MoE drops tokens in megatron-core (None: it never does, like every HF MoE).

    megatron-core (moe_utils.apply_router_token_dropping, get_capacity) gives each expert
    capacity = ceil(N·k/E·CF) of the N tokens of a forward, with E = E·G experts and top-k = T·G
    for granular experts: the G cancel, capacity = ceil(N·T/E·CF). A token picks k *distinct*
    experts, so an expert receives at most N tokens; CF >= E/T makes capacity >= N (ceil only
    rounds up), so no token is ever dropped, whatever N, drop_policy or padding (padded slots
    carry probability 0 and add exactly 0). Below E/T a busy expert drops tokens, which a
    Hugging Face MoE (always dropless) does not.
    """
    moe = cfg.moe
    if moe.num_experts == 0 or moe.capacity_factor is None:
        return None
    if Fraction(float(moe.capacity_factor)) * moe.topk >= moe.num_experts:
        return None
    return (f"moe.capacity_factor={moe.capacity_factor} < E/T = {moe.num_experts}/{moe.topk}: megatron-core "
            "dropped tokens beyond each expert's capacity, every Hugging Face MoE is dropless, so the "
            "exported model routes every token (it computes what this model computes without capacity); "
            "export.dropless_inference=true exports it anyway")


def _refusal(head: str, problems: dict[str, list[str]], cfg: Any) -> ExportError:
    lines = [f"  - {name}: {p}" for name, ps in problems.items() for p in ps]
    spec = UpcycleSpec.of(cfg)
    if spec.is_moe and spec.router.routing_at_inference(spec.topk) in ("sigmoid_bias", "sigmoid"):
        lines += [f"  - also checked: {f}" for f in SIGMOID_FORMATS_CHECKED]
    return ExportError(f"{head}, so no folder was written:\n" + "\n".join(lines)
                       + "\nSee README, Export, for what each Hugging Face architecture holds.")


def choose_target(cfg: Any) -> ExportTarget:
    """The target ``export.architecture`` names (auto: the first exact one); refused when not exact."""
    asked = str(_export_option(cfg, "architecture", "auto") or "auto")
    capacity = dropped_tokens(cfg)
    if capacity and not _export_option(cfg, "dropless_inference", False):
        raise ExportError(f"this model dropped tokens in training, so no folder was written:\n  - {capacity}")
    if asked != "auto":
        if asked not in TARGETS:
            raise ExportError(f"export.architecture={asked} is not one nemo-upcycle writes: "
                              f"auto, {', '.join(TARGETS)}")
        problems = target_problems(TARGETS[asked], cfg)
        if problems:
            raise _refusal(f"export.architecture={asked}: {TARGETS[asked].architecture} would not compute what "
                           "this model computes (export.architecture=auto picks an exact one)", {asked: problems}, cfg)
        return TARGETS[asked]
    tried = {}
    for name in AUTO_ORDER:
        tried[name] = target_problems(TARGETS[name], cfg)
        if not tried[name]:
            return TARGETS[name]
    relevant = {n: ps for n, ps in tried.items() if TARGETS[n].is_moe == (cfg.moe.num_experts > 0)}
    family = Architecture.of(cfg.model).family
    # The targets that hold this attention say more than the list of those that do not.
    holding = {n: ps for n, ps in relevant.items() if family in TARGETS[n].families}
    relevant = holding or relevant
    raise _refusal("no Hugging Face architecture computes this configuration exactly", relevant, cfg)
