"""What to upcycle, resolved once from the configuration: the upcycling core reads this, not Hydra.

Fine-grained experts (G > 1) are E·G experts of width F/G routed top-T·G, so the arithmetic
on E, T and G lives here and nowhere else, and so does the shared expert's. The dense FFN is
a sum over its intermediate neurons, FFN(x) = sum_s FFN_s(x) over any split into slices s
(the down projection is linear), which makes each shape exact at step 0:

* ``moe.shared_expert.mode=copy``: the shared expert is the whole FFN with its down projection
  scaled by alpha, the routed experts' by 1 - alpha (on top of the routing's own scaling):
  alpha·FFN + (1 - alpha)·FFN = FFN. Scaled weights rather than megatron-core's
  ``moe_router_topk_scaling_factor``: every Hugging Face target then holds the model as a
  plain copy of the tensors, and reads back bit for bit.
* ``moe.shared_expert.mode=slices``: of the FFN's G slices, the first S are the shared expert
  (concatenated, width S·F/G) and each of the E groups holds the other G - S as G - S routed
  experts of width F/G, routed top-T·(G - S) with one router row per group, down projections
  scaled by G - S: the shared slices plus the routed ones sum over all G slices.
* ``moe.shared_expert.gate``: a sigmoid gate starting at zero halves the shared output, so its
  down projection carries a factor 2 on top.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.config.moe_layers import moe_layer_indices, moe_layer_pattern
from nemo_upcycle.upcycle import scaling
from nemo_upcycle.upcycle.routers import RouterRow, router_row


@dataclass(frozen=True)
class UpcycleSpec:
    # The dense layer stack, from the architecture record (Architecture.of(cfg.model)).
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # F: the dense FFN width
    coarse_experts: int  # E: experts of the paper's notation (0: dense)
    coarse_topk: int  # T
    granularity: int  # G: each expert is F/G wide
    moe_layers: tuple[int, ...]  # global indices of the layers that become MoE layers
    router: RouterRow
    weight_scaling: str  # moe.weight_scaling: "auto" | "none" | "cube_root"
    shared_mode: str = "none"  # moe.shared_expert.mode: "none" | "copy" | "slices"
    shared_alpha: float = 0.5  # copy: the shared expert's share of the output
    shared_slices: int = 0  # slices: S, how many of the G slices the shared expert holds
    shared_gate: bool = False

    @classmethod
    def of(cls, cfg: Any) -> "UpcycleSpec":
        # The dense layer stack as the one architecture record reads it (checkpoint/architecture.py).
        arch, moe = Architecture.of(cfg.model), cfg.moe
        is_moe = moe.num_experts > 0
        return cls(
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            ffn_hidden_size=arch.ffn_hidden_size,
            coarse_experts=moe.num_experts,
            coarse_topk=moe.topk if is_moe else 0,
            granularity=moe.granularity if is_moe else 1,
            moe_layers=tuple(moe_layer_indices(moe.layers, arch.num_layers)) if is_moe else (),
            router=router_row(cfg.router.type),
            weight_scaling=moe.weight_scaling,
            **_shared_expert_fields(moe) if is_moe else {},
        )

    @property
    def is_moe(self) -> bool:
        return self.coarse_experts > 0

    @property
    def routed_slices(self) -> int:
        """Slices of the dense FFN each of the E groups of routed experts holds: G, or G - S."""
        return self.granularity - (self.shared_slices if self.shared_mode == "slices" else 0)

    @property
    def first_routed_slice(self) -> int:
        """The routed experts take slices first_routed_slice .. G - 1 (the shared expert the ones before)."""
        return self.granularity - self.routed_slices

    def ffn_slice_of(self, expert: int) -> int:
        """Which of the G slices of the dense FFN (global) routed expert ``expert`` starts as."""
        return self.first_routed_slice + expert % self.routed_slices

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer as megatron-core sees them: E·G (E·(G - S) with shared slices)."""
        return self.coarse_experts * self.routed_slices

    @property
    def topk(self) -> int:
        """megatron-core's top-k: T·G (T·(G - S)), so that top-k can pick whole virtual groups."""
        return self.coarse_topk * self.routed_slices

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size // self.granularity

    @property
    def has_shared_expert(self) -> bool:
        return self.is_moe and self.shared_mode != "none"

    @property
    def shared_ffn_hidden_size(self) -> int:
        """The shared expert's width (megatron-core's moe_shared_expert_intermediate_size); 0: none."""
        if not self.has_shared_expert:
            return 0
        if self.shared_mode == "copy":
            return self.ffn_hidden_size
        return self.shared_slices * self.expert_ffn_hidden_size

    def shared_fc2_factor(self) -> float:
        """The shared expert's down-projection factor: alpha (copy) or 1 (slices), x2 under a zero gate."""
        share = self.shared_alpha if self.shared_mode == "copy" else 1.0
        return share * (2.0 if self.shared_gate else 1.0)

    def layer_pattern(self) -> list[int]:
        """megatron-core's ``moe_layer_freq`` list: 1 for an MoE layer, 0 for a dense one."""
        return moe_layer_pattern(list(self.moe_layers), self.num_layers)

    def scaling_mode(self) -> str:
        """"none", "fc2_granularity" or "cube_root" (see nemo_upcycle.upcycle.scaling)."""
        return scaling.scaling_mode(self.weight_scaling, self.router.auto_scaling, self.coarse_experts,
                                    self.routed_slices)

    def scale_factors(self) -> tuple[float, float]:
        """(factor for a routed expert's fc1, for its fc2): the routing's scaling
        (nemo_upcycle.upcycle.scaling) times 1 - alpha beside a shared copy."""
        f1, f2 = scaling.scale_factors(self.scaling_mode(), self.num_experts, self.coarse_topk, self.routed_slices)
        return f1, f2 * (1.0 - self.shared_alpha if self.shared_mode == "copy" else 1.0)


def _shared_expert_fields(moe: Any) -> dict:
    shared = moe.get("shared_expert") if hasattr(moe, "get") else getattr(moe, "shared_expert", None)
    if shared is None or shared.mode == "none":
        return {}
    return dict(shared_mode=shared.mode, shared_alpha=float(shared.alpha),
                shared_slices=int(shared.slices) if shared.mode == "slices" else 0, shared_gate=bool(shared.gate))
