"""Which Hugging Face architecture computes a trained configuration exactly, or why none does.

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
from typing import Any, Optional

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.checkpoint.hf.moe_layouts import GATED, layout, shared_expert_kind
from nemo_upcycle.errors import UserError
from nemo_upcycle.upcycle.routers import ROUTINGS
from nemo_upcycle.upcycle.spec import UpcycleSpec


class ExportError(UserError):
    """The checkpoint or configuration cannot be exported; the message says why and what to do."""


ATTENTION_WORDS = {"llama": "plain attention", "mistral": "plain attention", "qwen2": "q/k/v biases",
                   "qwen3": "q/k norms"}


@dataclass(frozen=True)
class ExportTarget:
    name: str  # the value of export.architecture
    architecture: str  # the class transformers builds
    model_type: str
    families: tuple[str, ...]  # dense families whose attention it holds exactly
    routings: tuple[str, ...] = ()  # routings it computes (upcycle/routers.py ROUTINGS); () = a dense model
    # Which layers may keep a dense FFN: "none", "any" (Qwen's mlp_only_layers) or "first"
    # (GLM-4-MoE's first_k_dense_replace: layers 0..k-1).
    dense_layers: str = "none"
    head_dim_free: bool = True  # head_dim may differ from hidden_size / heads (Qwen2-MoE refuses it)

    @property
    def is_moe(self) -> bool:
        return bool(self.routings)


TARGETS = {t.name: t for t in (
    # Mixtral: softmax over all experts, top-k, renormalised = softmax over the k chosen logits.
    ExportTarget("mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), ("topk_softmax",)),
    # Qwen2-MoE: softmax, top-k, renormalised only with norm_topk_prob. Softmax over all then
    # renormalising the k chosen is exp(l_i) / sum_{j chosen} exp(l_j), megatron's top-k then
    # softmax; the chosen experts agree because softmax keeps the order of the logits.
    # qkv_bias switches its q/k/v biases off for a Llama. Its shared expert holds the model's,
    # gated or ungated (gate fixed at zero, down_proj x2), or is written inert.
    ExportTarget("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"),
                 ("topk_softmax", "softmax_topk"), dense_layers="any", head_dim_free=False),
    # Qwen3-MoE: the same routing, no shared expert, q/k norms always on (a Qwen3 attention).
    ExportTarget("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",),
                 ("topk_softmax", "softmax_topk"), dense_layers="any"),
    # GLM-4-MoE (Glm4MoeTopkRouter): sigmoid scores, e_score_correction_bias added for the
    # choice only, the chosen scores renormalised (+1e-20, as megatron-core) when
    # norm_topk_prob, times routed_scaling_factor (1.0); with n_group = topk_group = 1 its
    # group-limited choice is a plain top-k. Its attention is a Llama's with
    # partial_rotary_factor=1.0 (rotate_half RoPE over the whole head), q/k/v biases by
    # attention_bias (no o_proj bias: Qwen2's) and q/k norms by use_qk_norm (Qwen3's, before
    # RoPE). Its ungated shared experts (n_shared_experts x the routed width) hold the model's
    # ungated one (copy: G slices wide, slices: S) or are written inert.
    ExportTarget("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe", ("llama", "mistral", "qwen2", "qwen3"),
                 ("sigmoid_bias",), dense_layers="first"),
    ExportTarget("llama", "LlamaForCausalLM", "llama", ("llama", "mistral")),
    ExportTarget("qwen2", "Qwen2ForCausalLM", "qwen2", ("qwen2",)),
    ExportTarget("qwen3", "Qwen3ForCausalLM", "qwen3", ("qwen3",)),
)}
AUTO_ORDER = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "llama", "qwen2", "qwen3")
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
    lay = layout(target.model_type)
    if lay.holds(kind):
        return []
    holders = " and ".join(t.architecture for t in TARGETS.values() if t.is_moe and layout(t.model_type).holds(kind))
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
