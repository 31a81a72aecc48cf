"""The ``trainer.*`` settings: precision, recomputation, checkpointing and the router-collapse guards."""
from __future__ import annotations

from typing import Any

# trainer.precision -> the parameters' torch dtype (model/modeling.py params_dtype_for);
# "auto" = bf16 on a GPU, fp32 on CPU. Named here, not as torch dtypes: checking the
# configuration imports no torch.
PARAMS_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
PRECISIONS = ("auto", *PARAMS_DTYPE_NAMES)


def precision_problems(cfg: Any) -> list[str]:
    """A closed choice: any other spelling (``bf16-mixed``, ``32``) would have to be guessed,
    and a wrong guess trains with Adam's states in the wrong dtype."""
    precision = cfg.trainer.precision
    if precision in PRECISIONS:
        return []
    return [f"trainer.precision={precision} must be one of {', '.join(PRECISIONS)} (bf16: bf16 weights, "
            "fp32 master weights and gradient reduction; fp32: fp32 throughout; auto: bf16 on a GPU, "
            "fp32 on CPU)"]


def checkpoint_problems(cfg: Any) -> list[str]:
    every = cfg.trainer.checkpoint_every_n_steps
    if every >= 0:
        return []
    return [f"trainer.checkpoint_every_n_steps={every} must be >= 0 (0 = save no checkpoint)"]


def guard_problems(cfg: Any) -> list[str]:
    """The optional router-collapse thresholds (nemo_upcycle/training/guards.py) must be able
    to fire at all, and must not fire on every step."""
    tr, moe = cfg.trainer, cfg.moe
    dropped, load = tr.guard_max_dropped_fraction, tr.guard_max_load_ratio
    if dropped is None and load is None:
        return []
    if moe.num_experts == 0:
        return ["trainer.guard_max_dropped_fraction / guard_max_load_ratio watch the routers, and "
                "moe=dense has none: set them to null"]
    problems = []
    if dropped is not None:
        if not 0.0 <= dropped < 1.0:
            problems.append(f"trainer.guard_max_dropped_fraction={dropped} must be in [0, 1) (null = off)")
        elif moe.capacity_factor is None:
            problems.append(
                f"trainer.guard_max_dropped_fraction={dropped} can never fire: moe.capacity_factor=null "
                "is dropless; set a capacity factor or the guard to null"
            )
    if load is not None:
        # Each token picks top-k distinct experts, so the busiest expert gets at most 1/k of
        # the assignments: E/k times its fair share (the same ratio counted in fine experts).
        ceiling = moe.num_experts / moe.topk if moe.topk else float("inf")
        if not 1.0 <= load < ceiling:
            problems.append(
                f"trainer.guard_max_load_ratio={load} must be >= 1 (1 = perfectly balanced) and below "
                f"moe.num_experts/moe.topk = {ceiling:g}, the most the busiest expert can get (null = off)"
            )
    return problems


# trainer.recompute -> megatron-core's recompute_granularity (model/modeling.py recompute_kwargs).
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# The selective modules megatron-core offers for this project's models (a Llama attention, no
# shared experts, no multi-latent attention), and what each recomputes.
RECOMPUTE_MODULES = {
    "core_attn": "the attention scores and softmax",
    "layernorm": "the RMSNorms before attention and MLP",
    "mlp": "the FFN of dense layers",
    "moe": "each MoE layer as a whole",
    "moe_act": "the experts' SwiGLU activation (needs the grouped-GEMM experts, GPU only)",
}


def recompute_problems(cfg: Any) -> list[str]:
    """``trainer.recompute`` and its details, with the rules megatron-core's TransformerConfig
    applies (it would raise them only while the model is built)."""
    tr, par = cfg.trainer, cfg.parallel
    if tr.recompute not in RECOMPUTE_GRANULARITIES:
        return [f"trainer.recompute={tr.recompute} must be one of {', '.join(RECOMPUTE_GRANULARITIES)} "
                "(selective: trainer.recompute_modules of each layer; full: whole layers, "
                "trainer.recompute_method and trainer.recompute_num_layers)"]
    problems = []
    if tr.recompute == "selective":
        modules = list(tr.recompute_modules)
        unknown = [m for m in modules if m not in RECOMPUTE_MODULES]
        if unknown or not modules:
            problems.append(
                f"trainer.recompute_modules=[{','.join(map(str, modules))}]: "
                + (f"{', '.join(map(str, unknown))} not available; " if unknown else "empty; ")
                + "choose from " + "; ".join(f"{m} ({what})" for m, what in RECOMPUTE_MODULES.items()))
        if "moe_act" in modules and cfg.moe.num_experts == 0:
            problems.append("trainer.recompute_modules contains moe_act and the model has no experts "
                            "(moe.num_experts=0): drop moe_act")
        elif "moe_act" in modules and not _grouped_gemm_experts():
            problems.append("trainer.recompute_modules contains moe_act, which megatron-core recomputes only in "
                            "grouped-GEMM experts, and this machine runs the sequential ones (no GPU or no "
                            "Transformer Engine); drop moe_act or use trainer.recompute=full")
    elif tr.recompute == "full":
        if tr.recompute_method not in RECOMPUTE_METHODS:
            problems.append(f"trainer.recompute_method={tr.recompute_method} must be uniform (groups of "
                            "recompute_num_layers layers) or block (the first recompute_num_layers layers "
                            "of each pipeline chunk)")
        chunks = par.pp * (par.vpp or 1)
        per_chunk = cfg.model.num_layers // chunks if chunks > 0 and cfg.model.num_layers else None
        layers = tr.recompute_num_layers
        if per_chunk is not None and not 1 <= layers <= per_chunk:
            problems.append(f"trainer.recompute_num_layers={layers} must be between 1 and the {per_chunk} "
                            f"layers of a pipeline chunk (model.num_layers={cfg.model.num_layers} over "
                            f"parallel.pp*vpp = {chunks})")
        elif (per_chunk is not None and tr.recompute_method == "uniform" and per_chunk % layers):
            problems.append(f"trainer.recompute_method=uniform recomputes groups of trainer.recompute_num_layers"
                            f"={layers} layers, which must divide the {per_chunk} layers of a pipeline chunk")
    return problems


def _grouped_gemm_experts() -> bool:
    from nemo_upcycle.model.fused_paths import fused_paths_for_this_machine

    return fused_paths_for_this_machine().moe_grouped_gemm
