"""Execute an upcycle plan: one sharded read, in-memory expert copies, router init."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nemo_upcycle.upcycle import symmetry
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.upcycle.local_model import RankCoordinates
from nemo_upcycle.upcycle.plan import PlanEntry, UpcyclePlan, plan_upcycle
from nemo_upcycle.upcycle.router_init import router_weights
from nemo_upcycle.checkpoint.sources.slices import DenseSource, SliceRequest
from nemo_upcycle.upcycle.spec import UpcycleSpec
from nemo_upcycle.upcycle.walk_megatron import describe_chunks


@dataclass
class UpcycleReport:
    bytes_read: int
    chunks_read: int
    elements_read: int
    tensors_read: int
    expert_copies: int
    routers_initialised: int
    channels_reinitialised: int
    scaling: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def named_tensors(chunks: list) -> dict[str, torch.Tensor]:
    return {f"{c}/{name}": p for c, chunk in enumerate(chunks) for name, p in chunk.named_parameters()}


def slice_requests(plan: UpcyclePlan, tensors: dict[str, torch.Tensor]) -> list[SliceRequest]:
    requests = []
    for entry in plan.entries:
        target = tensors[entry.target]
        for piece in entry.pieces:
            rows_axis = 1 if piece.squeeze_layer else 0
            rows = piece.dense.shape[rows_axis]
            view = target.data
            if view.dim() and (piece.row or rows != view.shape[0]):
                view = view.narrow(0, piece.row, rows)
            if piece.squeeze_layer:
                view = view.unsqueeze(0)
            requests.append(SliceRequest(piece.dense.key, piece.dense.offsets, view))
    return requests


def _expert_entries(plan: UpcyclePlan) -> list[PlanEntry]:
    return [e for e in plan.entries if e.kind in ("expert", "copy")]


def upcycle_from_dense(chunks: list, cfg: Any, source: DenseSource) -> UpcycleReport:
    """Fill this rank's model chunks from ``source``. No collective is issued."""
    started = time.perf_counter()
    spec, rank = UpcycleSpec.of(cfg), RankCoordinates.current()
    plan = plan_upcycle(describe_chunks(chunks), rank, spec, source.tensor_shapes())
    tensors = named_tensors(chunks)
    # Models built for upcycling skip megatron's random init (perform_initialization=False:
    # every value is written here), so a parameter the plan missed would hold garbage.
    unplanned = sorted(set(tensors) - {e.target for e in plan.entries})
    if unplanned:
        raise UpcycleError(f"the upcycle plan does not fill {len(unplanned)} parameter(s): {unplanned[:5]}")
    with torch.no_grad():
        stats = source.read(slice_requests(plan, tensors))
        copies = plan.by_kind("copy")
        for entry in copies:
            tensors[entry.target].data.copy_(tensors[entry.copy_from].data)
        f1, f2 = spec.scale_factors()
        reinitialised = 0
        if spec.is_moe:
            for entry in _expert_entries(plan):
                factor = f1 if entry.role == "fc1" else f2
                if factor != 1.0:
                    tensors[entry.target].data.mul_(factor)
            reinitialised = _break_symmetry(plan, tensors, cfg, spec, rank)
            for entry in plan.by_kind("shared"):
                if entry.role == "fc2" and spec.shared_fc2_factor() != 1.0:
                    tensors[entry.target].data.mul_(spec.shared_fc2_factor())
            for entry in plan.by_kind("shared_gate"):
                tensors[entry.target].data.zero_()  # sigmoid(0) = 1/2, which shared_fc2_factor undoes
        routers = plan.by_kind("router")
        for entry in routers:
            weight = router_weights(cfg.seed, entry.layer, spec, cfg.router.init_std)
            tensors[entry.target].data.copy_(weight)
    return UpcycleReport(
        bytes_read=stats.bytes_read,
        chunks_read=stats.chunks_read,
        elements_read=stats.elements_delivered,
        tensors_read=len(stats.keys),
        expert_copies=len(copies),
        routers_initialised=len(routers),
        channels_reinitialised=reinitialised,
        scaling=spec.scaling_mode(),
        seconds=time.perf_counter() - started,
    )


def _break_symmetry(plan: UpcyclePlan, tensors: dict[str, torch.Tensor], cfg: Any,
                    spec: UpcycleSpec, rank: RankCoordinates) -> int:
    moe = cfg.moe
    if not moe.expert_noise_std and not moe.drop_upcycling_ratio:
        return 0
    etp_rank = rank.etp_rank
    reinitialised = 0
    pairs: dict[tuple[int, int], dict[str, PlanEntry]] = {}
    for entry in _expert_entries(plan):
        pairs.setdefault((entry.layer, entry.expert), {})[entry.role] = entry
    expert_width = spec.expert_ffn_hidden_size
    for (layer, expert), roles in sorted(pairs.items()):
        fc1, fc2 = tensors[roles["fc1"].target].data, tensors[roles["fc2"].target].data
        local_width = fc2.shape[1]
        if moe.drop_upcycling_ratio:
            channels = symmetry.dropped_channels(cfg.seed, layer, expert, expert_width, moe.drop_upcycling_ratio)
            reinitialised += symmetry.reinit_channels(
                fc1, fc2, channels, etp_rank * local_width, cfg.seed, layer, expert
            )
        if moe.expert_noise_std:
            symmetry.add_noise(fc1, moe.expert_noise_std, cfg.seed, layer, expert, 2 * etp_rank)
            symmetry.add_noise(fc2, moe.expert_noise_std, cfg.seed, layer, expert, 2 * etp_rank + 1)
    return reinitialised
