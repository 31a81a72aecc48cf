"""Per-layer router statistics: expert load, dropped tokens, router entropy.

Forward hooks on megatron-core's routers see each layer's input and its routing map
(after capacity dropping), so the statistics are exactly what the model did, on any
layout. Totals are summed over ranks on request; fractions are unaffected by ranks
that routed the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class LayerRouterStats:
    tokens: float = 0.0  # tokens routed (each counted once)
    assignments: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # per expert
    entropy_sum: float | torch.Tensor = 0.0  # a tensor on the routing map's device while collecting
    topk: int = 1

    @property
    def load(self) -> torch.Tensor:
        total = self.assignments.sum()
        return self.assignments / total if total > 0 else self.assignments

    @property
    def dropped_fraction(self) -> float:
        wanted = self.tokens * self.topk
        return 0.0 if wanted == 0 else max(0.0, 1.0 - float(self.assignments.sum()) / wanted)

    @property
    def mean_entropy(self) -> float:
        return float(self.entropy_sum) / self.tokens if self.tokens else 0.0

    @property
    def max_load_ratio(self) -> float:
        """Busiest expert's load over the fair share (1.0 = perfectly balanced)."""
        n = self.assignments.numel()
        return float(self.load.max() * n) if n and self.assignments.sum() > 0 else 0.0


class RouterStatsCollector:
    """Context manager: ``with RouterStatsCollector(chunks) as stats: model(...)``."""

    def __init__(self, chunks: list):
        self.chunks = chunks
        self.layers: dict[int, LayerRouterStats] = {}
        self._handles = []

    def __enter__(self) -> "RouterStatsCollector":
        from megatron.core.transformer.moe.router import TopKRouter

        for chunk in self.chunks:
            for layer in chunk.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if isinstance(router, TopKRouter):
                    self._handles.append(router.register_forward_hook(self._hook(layer.layer_number - 1)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(router, inputs, outputs):
            _, routing_map = outputs
            hidden = inputs[0].detach()
            with torch.no_grad():
                logits = hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.detach().float().t()
                log_probs = torch.log_softmax(logits, dim=-1)
                entropy = -(log_probs.exp() * log_probs).sum(-1)
            stats = self.layers.get(layer)
            if stats is None:
                stats = self.layers[layer] = LayerRouterStats(
                    # On the routing map's device: adds per forward, no copy to the host (no GPU sync).
                    assignments=torch.zeros(routing_map.shape[-1], dtype=torch.float64, device=routing_map.device),
                    entropy_sum=torch.zeros((), dtype=torch.float64, device=routing_map.device),
                    topk=router.topk,
                )
            stats.tokens += float(routing_map.shape[0])
            stats.assignments += routing_map.sum(0).to(torch.float64)
            stats.entropy_sum += entropy.sum().to(torch.float64)

        return hook

    def all_reduce(self, num_layers: int, num_experts: int, topk: int, group=None) -> None:
        """Sum statistics over all ranks (every rank must call this).

        Training passes a dedicated ``group`` so these reductions never interleave with the
        model's own collectives on the default group.
        """
        import torch.distributed as dist

        from nemo_upcycle.platform.device import collective_device

        if not dist.is_initialized():
            return
        # The group's device (the training job reduces over a gloo group: the host, also on a GPU).
        packed = torch.zeros(num_layers, num_experts + 2, dtype=torch.float64, device=collective_device(group))
        for layer, s in self.layers.items():
            packed[layer, :num_experts] = s.assignments
            packed[layer, num_experts] = s.tokens
            packed[layer, num_experts + 1] = s.entropy_sum
        dist.all_reduce(packed, group=group)
        self.layers = {
            layer: LayerRouterStats(
                tokens=float(packed[layer, num_experts]),
                assignments=packed[layer, :num_experts].clone(),
                entropy_sum=float(packed[layer, num_experts + 1]),
                topk=topk,
            )
            for layer in range(num_layers)
            if packed[layer, num_experts] > 0
        }


def uniform_entropy(num_experts: int) -> float:
    return math.log(num_experts)
