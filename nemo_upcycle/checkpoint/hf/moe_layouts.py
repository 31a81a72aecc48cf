"""How each Hugging Face MoE architecture names an MoE layer's tensors, and how it holds a shared expert.

Each MoE export target's row (checkpoint/hf/export_targets.py) holds one :class:`MoeLayout`.
It spells the router (and its selection bias), the experts' SwiGLU projections and the shared
expert the architecture always runs (Qwen2-MoE: ``shared_expert`` behind a sigmoid gate
``shared_expert_gate``; GLM-4-MoE: ``shared_experts``, ungated);
:mod:`nemo_upcycle.checkpoint.hf.mapping` turns it into row boxes. An architecture's shared
expert holds megatron-core's in one of three ways:

* *inert* (the model has none, ``moe.shared_expert.mode=none``): its tensors are written as
  zeros; the zero down projection makes its output exactly 0 (0 times any finite number),
  and on import they are checked to be so and dropped;
* *gated* (``moe.shared_expert.gate=true``, Qwen2-MoE): megatron-core's SharedExpertMLP with
  its ``gate_weight`` is exactly Qwen2-MoE's ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``;
* *ungated*: GLM-4-MoE's shared experts as they are; on Qwen2-MoE, whose gate is always there,
  the gate is written as zeros and the down projection times :data:`FIXED_GATE_FACTOR` = 2:
  sigmoid(0) is exactly 1/2 in every floating-point format, and scaling by a power of two
  commutes with every rounding of the products and sums (away from overflow and the subnormal
  range, 2^-126 in fp32 and bf16), so 1/2 · (x·2W) is x·W bit for bit. Import halves it back
  (exact too) when ``config.json`` records the model as ungated
  (``nemo_upcycle.shared_expert.gate=false``) and the gate is zero: a gated model's gate is
  zero at step 0 as well, so the tensors alone could not say which the folder holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_upcycle.errors import UserError

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

    def hf_shared_width(self, spec) -> int:
        """The width this layer's shared expert is written with: the model's (UpcycleSpec), or
        where it has none the inert one's: one routed expert's width where the width counts in
        those (GLM-4-MoE), else :data:`INERT_SHARED_EXPERT_WIDTH`."""
        if spec.has_shared_expert:
            return spec.shared_ffn_hidden_size
        return spec.expert_ffn_hidden_size if self.shared_in_routed_widths else INERT_SHARED_EXPERT_WIDTH

    def shared_shapes(self, prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
        """The shared expert's tensors of one MoE layer (empty when the architecture has none)."""
        if not self.shared:
            return {}
        out = {self.shared_proj(prefix, self.gate): (width, hidden), self.shared_proj(prefix, self.up): (width, hidden),
               self.shared_proj(prefix, self.down): (hidden, width)}
        if self.shared_gate:
            out[self.shared_gate_name(prefix)] = (1, hidden)
        return out


# What an MoE folder reads back as (checkpoint/hf/read_back.py; each target's row reads its own
# config.json keys into one: checkpoint/hf/export_targets.py).

class MoeFolderError(UserError):
    """An MoE folder whose model megatron-core's MoE here cannot represent exactly."""


@dataclass
class MoeReadBack:
    num_experts: int = 0  # per MoE layer, as megatron-core counts them (E·G)
    topk: int = 0
    moe_layers: list = field(default_factory=list)
    expert_ffn_hidden_size: int = 0
    dense_ffn_hidden_size: int = 0
    granularity: int = 1
    router: str = "topk_softmax"
    layout: str = "mixtral"
    shared_expert_width: int = 1  # of the HF shared expert, live or inert
    # megatron-core's shared expert (moe.shared_expert.*): none, copy (the dense FFN) or slices
    # (S of its G slices); gated by a sigmoid or not. Set by read_back.read_shared_expert.
    shared_mode: str = "none"
    shared_slices: int = 0
    shared_gate: bool = False

    @property
    def shared_expert(self) -> str:
        """How the folder's shared expert holds megatron-core's (INERT, GATED, UNGATED above)."""
        if self.shared_mode == "none":
            return INERT
        return GATED if self.shared_gate else UNGATED

    @property
    def routed_slices(self) -> int:
        """Slices of the dense FFN each group of routed experts holds: G, or G - S beside S shared ones."""
        return self.granularity - self.shared_slices

    def coarse(self) -> tuple[int, int]:
        """(moe.num_experts, moe.topk) of the configuration with this granularity and shared expert."""
        return self.num_experts // self.routed_slices, self.topk // self.routed_slices

    def shared_overrides(self) -> list[str]:
        """The ``moe.shared_expert.*`` overrides of the configuration (none without a shared expert)."""
        if self.shared_mode == "none":
            return []
        return ([f"moe.shared_expert.mode={self.shared_mode}", f"moe.shared_expert.gate={str(self.shared_gate).lower()}"]
                + ([f"moe.shared_expert.slices={self.shared_slices}"] if self.shared_mode == "slices" else []))
