"""Which of megatron-core's fused kernels the model uses: each one that this machine can run.

:func:`probe` reads what is importable, through the names megatron-core itself tests (so a
kernel counts as present exactly when megatron-core would accept it), and
:func:`choose_fused_paths` turns that into one decision per setting, each with its reason.
On a CPU every fused path is off: they are CUDA kernels (or ``torch.compile`` fusions that
this project does not run on CPU). The choice is logged once per process (rank 0 shows it).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields

from nemo_upcycle.platform.device import gpu_available

log = logging.getLogger("nemo_upcycle.fused_paths")


def transformer_engine_available() -> bool:
    """TE is used when installed and a GPU is present (the NGC container)."""
    if not gpu_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Availability:
    """What this machine offers (see :func:`probe`)."""

    gpu: bool
    # Transformer Engine importable and usable (:func:`transformer_engine_available`).
    transformer_engine: bool
    # apex's fused_weight_gradient_mlp_cuda: megatron's own linear layers need it for
    # gradient-accumulation fusion (tensor_parallel.layers._grad_accum_fusion_available).
    apex_fused_weight_gradient: bool = False
    # TE's fused RoPE (rope_utils.fused_apply_rotary_pos_emb[_thd], TE >= 1.4).
    te_fused_rope: bool = False
    # TE's token permutation ops (moe_utils.fused_permute & co., TE >= 2.1).
    te_fused_permute: bool = False
    # TE's grouped linear layers (TEColumnParallelGroupedLinear, TE >= 1.9): TEGroupedMLP.
    te_grouped_linear: bool = False
    # TE's parallel cross entropy (language_module.te_parallel_cross_entropy).
    te_cross_entropy: bool = False
    # The standalone ``grouped_gemm`` package (megatron's legacy GroupedMLP).
    grouped_gemm_package: bool = False


@dataclass(frozen=True)
class FusedPaths:
    """One TransformerConfig setting per field, and why (``reasons[field]``)."""

    gradient_accumulation_fusion: bool
    bias_activation_fusion: bool
    apply_rope_fusion: bool
    moe_permute_fusion: bool
    moe_grouped_gemm: bool
    cross_entropy_loss_fusion: bool
    # 'te' (TE's parallel cross entropy) or 'native' (megatron-core's fused one).
    cross_entropy_fusion_impl: str
    reasons: dict

    def model_kwargs(self) -> dict:
        """The TransformerConfig keywords of the model itself (the loss's are :meth:`loss_kwargs`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("reasons", *self.loss_kwargs())}

    def loss_kwargs(self) -> dict:
        return dict(cross_entropy_loss_fusion=self.cross_entropy_loss_fusion,
                    cross_entropy_fusion_impl=self.cross_entropy_fusion_impl)

    def summary(self) -> str:
        """One line: each setting on or off, grouped by reason."""
        names = [f.name for f in fields(self) if f.name not in ("reasons", "cross_entropy_fusion_impl")]
        by_reason: dict[str, list[str]] = {}
        for name in names:
            by_reason.setdefault(self.reasons[name], []).append(f"{name}={'on' if getattr(self, name) else 'off'}")
        return "fused paths: " + "; ".join(f"{', '.join(group)} ({why})" for why, group in by_reason.items())


def choose_fused_paths(available: Availability) -> FusedPaths:
    """Each fused path that ``available`` can run is on; the others are off, with the reason."""
    a = available
    reasons = {}

    def decide(name: str, on: bool, why_on: str, why_off: str) -> bool:
        reasons[name] = why_on if on else why_off
        return on

    if not a.gpu:
        off = "no GPU: these are CUDA kernels (or torch.compile fusions) and this run is on CPU"
        reasons = {name: off for name in ("gradient_accumulation_fusion", "bias_activation_fusion",
                                          "apply_rope_fusion", "moe_permute_fusion", "moe_grouped_gemm",
                                          "cross_entropy_loss_fusion")}
        return FusedPaths(False, False, False, False, False, False, "native", reasons)
    te = a.transformer_engine
    return FusedPaths(
        # TE's linears fuse it themselves, but the output layer is always megatron's own
        # ColumnParallelLinear, which refuses the setting without apex's kernel.
        gradient_accumulation_fusion=decide(
            "gradient_accumulation_fusion", a.apex_fused_weight_gradient,
            "apex's fused_weight_gradient_mlp_cuda is importable",
            "apex's fused_weight_gradient_mlp_cuda is missing (megatron's output layer needs it, even with TE)"),
        # megatron-core's bias_swiglu_impl fuses SwiGLU with or without a bias (torch.compile).
        bias_activation_fusion=decide(
            "bias_activation_fusion", True, "megatron-core's fused SwiGLU (torch.compile on GPU)", ""),
        apply_rope_fusion=decide(
            "apply_rope_fusion", te and a.te_fused_rope,
            "Transformer Engine's fused RoPE", "needs Transformer Engine >= 1.4 (fused RoPE)"),
        moe_permute_fusion=decide(
            "moe_permute_fusion", te and a.te_fused_permute,
            "Transformer Engine's permutation ops", "needs Transformer Engine >= 2.1 (moe_permute)"),
        # The legacy GroupedMLP (grouped_gemm package) stores experts in a layout the
        # upcycler does not fill (nemo_upcycle/upcycle/walk_megatron.py): TEGroupedMLP only.
        moe_grouped_gemm=decide(
            "moe_grouped_gemm", te and a.te_grouped_linear,
            "Transformer Engine's grouped GEMM (TEGroupedMLP)",
            "needs Transformer Engine's grouped linear (TEGroupedMLP)"
            + ("; the grouped_gemm package's legacy GroupedMLP is not upcycled" if a.grouped_gemm_package else "")),
        # megatron-core's own fused cross entropy runs on any GPU (torch.compile); TE's is preferred.
        cross_entropy_loss_fusion=decide(
            "cross_entropy_loss_fusion", True,
            "Transformer Engine's parallel cross entropy" if te and a.te_cross_entropy
            else "megatron-core's fused cross entropy (torch.compile on GPU)", ""),
        cross_entropy_fusion_impl="te" if te and a.te_cross_entropy else "native",
        reasons=reasons,
    )


def _megatron_has(module: str, *names: str) -> bool:
    """Whether megatron-core's ``module`` defines every one of ``names`` as something (not None)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return all(getattr(mod, name, None) is not None for name in names)


def probe() -> Availability:
    """What this machine offers, read from the names megatron-core itself checks."""
    if not gpu_available():
        return Availability(gpu=False, transformer_engine=False)
    from megatron.core.tensor_parallel import layers

    try:
        from megatron.core.transformer.moe.grouped_gemm_util import grouped_gemm_is_available
        grouped_gemm_package = grouped_gemm_is_available()
    except ImportError:
        grouped_gemm_package = False
    return Availability(
        gpu=True,
        transformer_engine=transformer_engine_available(),
        apex_fused_weight_gradient=bool(layers._grad_accum_fusion_available),
        # megatron-core's own config check: either fused RoPE entry point is enough.
        te_fused_rope=(_megatron_has("megatron.core.models.common.embeddings.rope_utils", "fused_apply_rotary_pos_emb")
                       or _megatron_has("megatron.core.models.common.embeddings.rope_utils",
                                        "fused_apply_rotary_pos_emb_thd")),
        te_fused_permute=_megatron_has(
            "megatron.core.transformer.moe.moe_utils", "fused_permute", "fused_permute_with_probs",
            "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs", "fused_unpermute"),
        te_grouped_linear=_megatron_has("megatron.core.extensions.transformer_engine", "TEColumnParallelGroupedLinear"),
        te_cross_entropy=_megatron_has("megatron.core.models.common.language_module.language_module",
                                       "te_parallel_cross_entropy"),
        grouped_gemm_package=grouped_gemm_package,
    )


@functools.lru_cache(maxsize=None)
def fused_paths_for_this_machine() -> FusedPaths:
    """The choice for this process's machine, probed and logged once."""
    chosen = choose_fused_paths(probe())
    log.info(chosen.summary())
    return chosen
