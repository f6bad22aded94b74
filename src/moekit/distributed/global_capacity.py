"""Capacity decisions over a data-parallel batch: the same drops as one process would make.

Legend: T = tokens per rank, K = slots per token, R = ranks.

Each rank gathers every rank's routing decision (expert ids, combine weights and masks: a few
integers and floats per assignment, nothing of ``d_model`` size), runs the single-process
planner on the concatenated global batch (ranks hold consecutive slices of it) and keeps its own
slice of the resulting keep mask. Capacity is computed from the global token count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.dispatch.dispatcher import DispatchConfig
from moekit.dispatch.sort import plan_dispatch


def _gather(value: torch.Tensor, group) -> torch.Tensor:
    pieces = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, value.contiguous(), group=group)
    return torch.cat(pieces)


def global_capacity_keep_mask(
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    dispatch: DispatchConfig,
    training: bool,
    *,
    token_mask_T: torch.Tensor | None,
    assignment_mask_TK: torch.Tensor | None,
    sequence_length: int | None,
    group,
) -> tuple[int, torch.Tensor]:
    """``(capacity, keep_TK)``: this rank's assignments that survive the global capacity."""
    T, K = expert_idx_TK.shape
    sizes = _gather(torch.tensor([T], device=expert_idx_TK.device), group)
    if (sizes != T).any():
        raise ValueError(
            f"capacity mode with expert parallelism needs the same token count on every rank, "
            f"got {sizes.tolist()}"
        )
    device = expert_idx_TK.device
    token_mask = (
        torch.ones(T, dtype=torch.bool, device=device) if token_mask_T is None else token_mask_T
    )
    slot_mask = (
        torch.ones(T, K, dtype=torch.bool, device=device)
        if assignment_mask_TK is None
        else assignment_mask_TK
    )
    g_mask = _gather(token_mask.to(torch.uint8), group).bool()
    capacity = dispatch.capacity(int(g_mask.sum()), K, num_experts, training)
    if capacity is None:
        raise ValueError("global_capacity_keep_mask needs dispatch mode 'capacity'")
    plan = plan_dispatch(
        _gather(expert_idx_TK, group),
        _gather(weights_TK.detach(), group),
        num_experts,
        capacity=capacity,
        priority=dispatch.drop_priority,
        token_mask_T=g_mask,
        sequence_length=sequence_length,
        assignment_mask_TK=_gather(slot_mask.to(torch.uint8), group).bool(),
    )
    keep = torch.zeros(int(sizes.sum()) * K, dtype=torch.bool, device=expert_idx_TK.device)
    keep[plan.assignment_idx_M] = True
    rank = dist.get_rank(group)
    return capacity, keep[rank * T * K : (rank + 1) * T * K].view(T, K)
