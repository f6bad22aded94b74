"""Soft MoE dispatch: slots as convex mixes of tokens, experts on slots, tokens as mixes of slots.

Legend: B = sequences, S = tokens, D = d_model, E = experts, P = slots per expert, N = E * P.
"""

from __future__ import annotations

import torch

from moekit.routing.soft import SoftRoutingResult


def soft_dispatch_and_combine(
    x_BSD: torch.Tensor, routing: SoftRoutingResult, experts, num_experts: int
) -> torch.Tensor:
    """``Y = C . experts(D^T X)`` with expert e owning slots ``e*P .. e*P+P-1``.

    Returns:
        ``(B, S, D)``.
    """
    B, _, D = x_BSD.shape
    P = routing.slots_per_expert
    dispatch = routing.dispatch_BSN.to(x_BSD.dtype)
    slots_BND = dispatch.transpose(1, 2) @ x_BSD
    # group slot rows by expert: (B, E, P, D) -> (E, B, P, D) -> (E*B*P, D)
    rows_MD = slots_BND.view(B, num_experts, P, D).transpose(0, 1).reshape(-1, D)
    counts_E = torch.full((num_experts,), B * P, dtype=torch.long, device=x_BSD.device)
    out_MD = experts(rows_MD, counts_E)
    out_BND = out_MD.view(num_experts, B, P, D).transpose(0, 1).reshape(B, num_experts * P, D)
    return routing.combine_BSN.to(x_BSD.dtype) @ out_BND


def causal_soft_dispatch_and_combine(
    x_BSD: torch.Tensor, routing: SoftRoutingResult, experts, num_experts: int
) -> torch.Tensor:
    """``y_t = Σ_n C[t, n] f_{e(n)}(prefix slot[t, n])``; expert ``e`` owns slots
    ``e·P .. e·P+P-1``. Returns ``(B, S, D)``."""
    B, S, D = x_BSD.shape
    P = routing.slots_per_expert
    w_BSN = routing.dispatch_BSN.to(x_BSD.dtype)
    N = w_BSN.shape[-1]
    numerator_BSND = torch.cumsum(w_BSN.unsqueeze(-1) * x_BSD.unsqueeze(2), dim=1)
    denominator_BSN = torch.cumsum(w_BSN, dim=1).clamp(min=torch.finfo(w_BSN.dtype).tiny)
    slots_BSND = numerator_BSND / denominator_BSN.unsqueeze(-1)
    # rows grouped by expert: (B, S, E, P, D) -> (E, B, S, P, D) -> (E·B·S·P, D)
    rows_MD = slots_BSND.view(B, S, num_experts, P, D).permute(2, 0, 1, 3, 4).reshape(-1, D)
    counts_E = torch.full((num_experts,), B * S * P, dtype=torch.long, device=x_BSD.device)
    out_MD = experts(rows_MD, counts_E)
    out_BSND = out_MD.view(num_experts, B, S, P, D).permute(1, 2, 0, 3, 4).reshape(B, S, N, D)
    return (routing.combine_BSN.to(x_BSD.dtype).unsqueeze(-1) * out_BSND).sum(dim=2)
