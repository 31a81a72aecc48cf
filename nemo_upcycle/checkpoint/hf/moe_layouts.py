"""How each Hugging Face MoE architecture names an MoE layer's tensors, and how it holds a shared expert.

One row per ``model_type`` nemo-upcycle writes and reads back. A row spells the router (and
its selection bias), the experts' SwiGLU projections and the shared expert the architecture
always runs (Qwen2-MoE: ``shared_expert`` behind a sigmoid gate ``shared_expert_gate``;
GLM-4-MoE: ``shared_experts``, ungated); :mod:`nemo_upcycle.checkpoint.hf.mapping` turns it
into row boxes. An architecture's shared expert holds megatron-core's in one of three ways:

* *inert* (the model has none, ``moe.shared_expert.mode=none``): its tensors are written as
  zeros; the zero down projection makes its output exactly 0 (0 times any finite number),
  and on import they are checked to be so and dropped;
* *gated* (``moe.shared_expert.gate=true``, Qwen2-MoE): megatron-core's SharedExpertMLP with
  its ``gate_weight`` is exactly Qwen2-MoE's ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``;
* *ungated*: GLM-4-MoE's shared experts as they are; on Qwen2-MoE, whose gate is always there,
  the gate is written as zeros and the down projection times :data:`FIXED_GATE_FACTOR` = 2:
  sigmoid(0) is exactly 1/2 in every floating-point format, and scaling by a power of two
  commutes with every rounding of the products and sums (away from overflow and the subnormal
  range, 2^-126 in fp32 and bf16), so 1/2 · (x·2W) is x·W bit for bit. Import halves it back (exact too) when ``config.json`` records the model as ungated
  (``nemo_upcycle.shared_expert.gate=false``) and the gate is zero: a gated model's gate is
  zero at step 0 as well, so the tensors alone could not say which the folder holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Width of the inert shared expert Qwen2-MoE insists on. Its down projection is zero, so its
# output is exactly 0 whatever the width (0 times any finite number); one row keeps it small.
INERT_SHARED_EXPERT_WIDTH = 1
# 1 / sigmoid(0): what Qwen2-MoE's down projection carries for an ungated shared expert.
FIXED_GATE_FACTOR = 2.0

# config.json's "nemo_upcycle" entry recording the shared expert (hf/config_json.py writes it;
# its "gate" tells a Qwen2-MoE folder's fixed gate from a gated model's gate at zero).
SHARED_EXPERT_RECORD = "shared_expert"

# How an HF shared expert holds megatron-core's (LlamaShape.shared_expert).
INERT, GATED, UNGATED = "inert", "gated", "ungated"


def shared_expert_kind(spec) -> str:
    """INERT (none), GATED or UNGATED: the shared expert of an UpcycleSpec."""
    if not spec.has_shared_expert:
        return INERT
    return GATED if spec.shared_gate else UNGATED


@dataclass(frozen=True)
class MoeLayout:
    model_type: str
    block: str  # the layer's MoE module: "block_sparse_moe" (Mixtral) or "mlp"
    gate: str  # per-expert SwiGLU names: gate, up, down
    up: str
    down: str
    # The shared expert every MoE layer must have: "" (none), "shared_expert" (Qwen2-MoE) or
    # "shared_experts" (GLM-4-MoE, n_shared_experts times the routed width).
    shared: str = ""
    shared_gate: Optional[str] = None  # its sigmoid gate, (1, hidden) (Qwen2-MoE)
    # Its width is a number of routed-expert widths (GLM-4-MoE's n_shared_experts), not free.
    shared_in_routed_widths: bool = False
    router_bias: Optional[str] = None  # the per-expert selection bias (GLM-4-MoE)

    def router(self, prefix: str) -> str:
        return f"{prefix}{self.block}.gate.weight"

    def router_bias_name(self, prefix: str) -> str:
        return f"{prefix}{self.block}.gate.{self.router_bias}"

    def expert(self, prefix: str, e: int, proj: str) -> str:
        return f"{prefix}{self.block}.experts.{e}.{proj}.weight"

    def shared_proj(self, prefix: str, proj: str) -> str:
        return f"{prefix}{self.block}.{self.shared}.{proj}.weight"

    def shared_gate_name(self, prefix: str) -> str:
        return f"{prefix}{self.block}.{self.shared_gate}.weight"

    def holds(self, shared_expert: str) -> bool:
        """Whether this architecture holds megatron-core's shared expert of that kind exactly
        (INERT: the model has none, which every architecture holds)."""
        if shared_expert == INERT:
            return True
        return bool(self.shared) and (shared_expert == UNGATED or self.shared_gate is not None)

    def zero_tensors(self, prefix: str, shared_expert: str) -> list[str]:
        """The tensors written as zeros whose zeros make the folder compute megatron-core's layer:
        an inert shared expert's down projection, a fixed gate (import checks them zero)."""
        if not self.shared or shared_expert == GATED:
            return []
        if shared_expert == INERT:
            return [self.shared_proj(prefix, self.down)]
        return [self.shared_gate_name(prefix)] if self.shared_gate else []

    def shared_shapes(self, prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
        """The shared expert's tensors of one MoE layer (empty when the architecture has none)."""
        if not self.shared:
            return {}
        out = {self.shared_proj(prefix, self.gate): (width, hidden), self.shared_proj(prefix, self.up): (width, hidden),
               self.shared_proj(prefix, self.down): (hidden, width)}
        if self.shared_gate:
            out[self.shared_gate_name(prefix)] = (1, hidden)
        return out


LAYOUTS = {
    "mixtral": MoeLayout("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": MoeLayout("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj", shared="shared_expert",
                           shared_gate="shared_expert_gate"),
    "qwen3_moe": MoeLayout("qwen3_moe", "mlp", "gate_proj", "up_proj", "down_proj"),
    "glm4_moe": MoeLayout("glm4_moe", "mlp", "gate_proj", "up_proj", "down_proj", shared="shared_experts",
                          shared_in_routed_widths=True, router_bias="e_score_correction_bias"),
}


def layout(model_type: Optional[str]) -> MoeLayout:
    return LAYOUTS[model_type or "mixtral"]


def hf_shared_expert_width(spec, model_type: str) -> int:
    """The width of the shared expert an MoE layer of ``model_type`` is written with: the model's
    (UpcycleSpec), or where it has none the inert one's: one routed expert's width where the
    width counts in those (GLM-4-MoE), else :data:`INERT_SHARED_EXPERT_WIDTH`."""
    if spec.has_shared_expert:
        return spec.shared_ffn_hidden_size
    return spec.expert_ffn_hidden_size if layout(model_type).shared_in_routed_widths else INERT_SHARED_EXPERT_WIDTH
