"""How each Hugging Face MoE architecture names an MoE layer's tensors, and which of them are inert.

One row per ``model_type`` nemo-upcycle writes and reads back. A row spells the router (and
its selection bias), and the experts' SwiGLU projections; :mod:`nemo_upcycle.checkpoint.hf.mapping`
turns it into row boxes. *Inert* tensors are those an architecture requires but the
upcycled model does not have (the shared expert of Qwen2-MoE and GLM-4-MoE): written as
zeros, which make their contribution exactly zero, and on import checked to be so and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Width of the inert shared expert Qwen2-MoE insists on. Its down projection is zero, so its
# output is exactly 0 whatever the width (0 times any finite number); one row keeps it small.
INERT_SHARED_EXPERT_WIDTH = 1


@dataclass(frozen=True)
class MoeLayout:
    model_type: str
    block: str  # the layer's MoE module: "block_sparse_moe" (Mixtral) or "mlp"
    gate: str  # per-expert SwiGLU names: gate, up, down
    up: str
    down: str
    # The shared expert every MoE layer must have: "" (none), "shared_expert" (Qwen2-MoE, with
    # a sigmoid gate) or "shared_experts" (GLM-4-MoE, ungated, the width of the routed experts).
    shared: str = ""
    router_bias: Optional[str] = None  # the per-expert selection bias (GLM-4-MoE)

    def router(self, prefix: str) -> str:
        return f"{prefix}{self.block}.gate.weight"

    def router_bias_name(self, prefix: str) -> str:
        return f"{prefix}{self.block}.gate.{self.router_bias}"

    def expert(self, prefix: str, e: int, proj: str) -> str:
        return f"{prefix}{self.block}.experts.{e}.{proj}.weight"

    @property
    def zero_suffix(self) -> str:
        """The inert tensor whose zeros make the shared expert's output exactly zero (finite inputs)."""
        return f"{self.shared}.down_proj.weight"

    def inert_shapes(self, prefix: str, hidden: int, width: int = INERT_SHARED_EXPERT_WIDTH) -> dict[str, tuple[int, ...]]:
        """The zero tensors of one MoE layer (empty when the architecture has none)."""
        if not self.shared:
            return {}
        q = f"{prefix}{self.block}.{self.shared}."
        out = {q + "gate_proj.weight": (width, hidden), q + "up_proj.weight": (width, hidden),
               q + "down_proj.weight": (hidden, width)}
        if self.shared == "shared_expert":
            out[f"{prefix}{self.block}.shared_expert_gate.weight"] = (1, hidden)
        return out


LAYOUTS = {
    "mixtral": MoeLayout("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": MoeLayout("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj", shared="shared_expert"),
    "qwen3_moe": MoeLayout("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj"),
    "glm4_moe": MoeLayout("glm4_moe", "mlp", "gate_proj", "up_proj", "down_proj", shared="shared_experts",
                          router_bias="e_score_correction_bias"),
}


def layout(model_type: Optional[str]) -> MoeLayout:
    return LAYOUTS[model_type or "mixtral"]
