"""A slow, obviously-correct MoE forward: loops over tokens and their experts.

Used by tests to check the fast sort-and-group path (outputs and gradients), and by readers who
want the math in plain form. Capacity drops are decided by walking assignments one at a time in
priority order with a counter per expert.
"""

from __future__ import annotations

import torch

from moekit.dispatch.config import DropPriority
from moekit.routing.result import RoutingResult


def reference_moe_output(
    moe,
    x: torch.Tensor,
    routing: RoutingResult,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine expert outputs token by token for a given routing decision.

    Args:
        moe: an ``MoE`` layer (its experts, shared experts and dispatch config are used).
        x: ``(..., D)`` input.
        routing: the decision to apply (e.g. from ``moe.router`` or ``reference_route``).
        padding_mask: ``x.shape[:-1]`` bool, ``True`` for real tokens.

    Returns:
        ``(..., D)``, the same as ``moe(x, padding_mask).output`` for this routing.
    """
    x_TD = x.reshape(-1, moe.d_model)
    T, K = routing.expert_idx_TK.shape
    mask = [True] * T if padding_mask is None else padding_mask.reshape(-1).tolist()
    num_tokens = sum(mask)
    capacity = moe.dispatch.capacity(num_tokens, K, moe.num_experts, moe.training)

    slot_used = (
        [[True] * K for _ in range(T)]
        if routing.assignment_mask_TK is None
        else routing.assignment_mask_TK.tolist()
    )
    assignments = [(t, j) for t in range(T) for j in range(K) if mask[t] and slot_used[t][j]]
    if capacity is not None:
        if moe.dispatch.drop_priority is DropPriority.POSITION:
            assignments.sort(key=lambda a: (a[1], a[0]))
        elif moe.dispatch.drop_priority is DropPriority.TOKEN:
            S = x.shape[-2] if x.dim() >= 3 else T
            assignments.sort(key=lambda a: (a[0] % S, a[0] // S, a[1]))  # (position, seq, choice)
        else:
            weights = routing.weights_TK.detach()
            assignments.sort(key=lambda a: -float(weights[a[0], a[1]]))
        used = [0] * moe.num_experts
        kept = []
        for t, j in assignments:
            e = int(routing.expert_idx_TK[t, j])
            if used[e] < capacity:
                used[e] += 1
                kept.append((t, j))
        assignments = kept

    rows = [0.0 * x_TD[t] for t in range(T)]  # zero, still on the graph (all-padding batches)
    for t, j in assignments:
        e = int(routing.expert_idx_TK[t, j])
        expert_out = moe.experts.forward_one(e, x_TD[t : t + 1])[0]
        rows[t] = rows[t] + routing.weights_TK[t, j].to(x.dtype) * expert_out
    y_TD = torch.stack(rows)
    if moe.shared_experts is not None:
        y_TD = y_TD + torch.cat([moe.shared_experts(x_TD[t : t + 1]) for t in range(T)])
    return y_TD.view(x.shape)
