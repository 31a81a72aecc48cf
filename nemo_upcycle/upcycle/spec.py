"""What to upcycle, resolved once from the configuration: the upcycling core reads this, not Hydra.

Fine-grained experts (G > 1) are E·G experts of width F/G routed top-T·G, so the arithmetic
on E, T and G lives here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_upcycle.config.moe_layers import moe_layer_indices, moe_layer_pattern
from nemo_upcycle.upcycle import scaling
from nemo_upcycle.upcycle.routers import RouterRow, router_row


@dataclass(frozen=True)
class UpcycleSpec:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    coarse_experts: int  # E: experts of the paper's notation (0: dense)
    coarse_topk: int  # T
    granularity: int  # G: each expert is F/G wide
    moe_layers: tuple[int, ...]  # global indices of the layers that become MoE layers
    router: RouterRow
    weight_scaling: str  # moe.weight_scaling: "auto" | "none" | "cube_root"

    @classmethod
    def of(cls, cfg: Any) -> "UpcycleSpec":
        model, moe = cfg.model, cfg.moe
        is_moe = moe.num_experts > 0
        return cls(
            num_layers=model.num_layers,
            hidden_size=model.hidden_size,
            ffn_hidden_size=model.ffn_hidden_size,
            coarse_experts=moe.num_experts,
            coarse_topk=moe.topk if is_moe else 0,
            granularity=moe.granularity if is_moe else 1,
            moe_layers=tuple(moe_layer_indices(moe.layers, model.num_layers)) if is_moe else (),
            router=router_row(cfg.router.type),
            weight_scaling=moe.weight_scaling,
        )

    @property
    def is_moe(self) -> bool:
        return self.coarse_experts > 0

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer as megatron-core sees them: E·G."""
        return self.coarse_experts * self.granularity

    @property
    def topk(self) -> int:
        """megatron-core's top-k: T·G, so that top-k can pick whole virtual groups."""
        return self.coarse_topk * self.granularity

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size // self.granularity

    def layer_pattern(self) -> list[int]:
        """megatron-core's ``moe_layer_freq`` list: 1 for an MoE layer, 0 for a dense one."""
        return moe_layer_pattern(list(self.moe_layers), self.num_layers)

    def scaling_mode(self) -> str:
        """"none", "fc2_granularity" or "cube_root" (see nemo_upcycle.upcycle.scaling)."""
        return scaling.scaling_mode(self.weight_scaling, self.router.auto_scaling, self.coarse_experts,
                                    self.granularity)

    def scale_factors(self) -> tuple[float, float]:
        """(factor for fc1, factor for fc2), see nemo_upcycle.upcycle.scaling."""
        return scaling.scale_factors(self.scaling_mode(), self.num_experts, self.coarse_topk, self.granularity)
