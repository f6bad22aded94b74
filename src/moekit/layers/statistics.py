"""Per-call routing statistics of an MoE layer: cheap enough to leave on, and free of host
syncs (every number stays a tensor on the input's device until someone reads it), so they never
break a ``torch.compile`` graph; ``MoEConfig(statistics=False)`` skips them entirely.

Legend: T = tokens, E = experts, M = kept assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moekit.dispatch.sort import DispatchPlan
    from moekit.routing.result import RoutingResult
    from moekit.routing.soft import SoftRoutingResult


@dataclass
class RoutingStats:
    """What one MoE call did. All tensors are detached.

    Attributes:
        tokens_per_expert: ``(E,)`` assignments the router sent to each expert (demand).
        kept_per_expert: ``(E,)`` assignments each expert computed (after capacity drops).
        dropped_fraction: scalar, dropped assignments / routed assignments (0 when dropless).
        router_entropy: scalar, mean entropy (nats) of the router's distribution per token.
        capacity: per-expert capacity C of this call, ``None`` when dropless.
        experts_per_token: scalar, mean computed experts per real token (after drops).
        unrouted_fraction: scalar, share of real tokens that reached no routed expert (dropped
            everywhere, or chosen by no expert under expert choice).
    """

    tokens_per_expert: torch.Tensor
    kept_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    router_entropy: torch.Tensor
    capacity: int | None = None
    experts_per_token: torch.Tensor | None = None
    unrouted_fraction: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float | int | list[int] | None]:
        """Plain Python numbers, for logs."""
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "kept_per_expert": self.kept_per_expert.tolist(),
            "dropped_fraction": float(self.dropped_fraction),
            "router_entropy": float(self.router_entropy),
            "capacity": self.capacity,
            "experts_per_token": _maybe_float(self.experts_per_token),
            "unrouted_fraction": _maybe_float(self.unrouted_fraction),
        }


def _maybe_float(value: torch.Tensor | None) -> float | None:
    return None if value is None else float(value)


def router_entropy(
    probs_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over (real) tokens of ``-sum_i p_i log p_i``, detached."""
    probs_TE = probs_TE.detach()
    entropy_T = -(probs_TE * torch.log(probs_TE.clamp(min=1e-30))).sum(dim=-1)
    if token_mask_T is None:
        return entropy_T.sum() / max(entropy_T.numel(), 1)  # 0 for an empty batch, not NaN
    mask_T = token_mask_T.to(entropy_T.dtype)
    return (entropy_T * mask_T).sum() / mask_T.sum().clamp(min=1)


def routing_stats(
    routing: RoutingResult,
    plan: DispatchPlan,
    token_mask_T: torch.Tensor | None = None,
    global_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RoutingStats:
    """What one token-choice MoE call did, from its routing and dispatch plan.

    Args:
        routing: the router's decision for T tokens.
        plan: the dispatch plan (kept assignments per expert, capacity).
        token_mask_T: ``(T,)`` bool, ``True`` for real tokens.
        global_sum: sums the expert counts over the processes sharing the layer's load (expert
            or data parallelism), so load statistics are global.
    """
    total = global_sum or (lambda t: t)
    routed_E = total(plan.routed_per_expert_E.detach())
    kept_E = total(plan.kept_per_expert_E.detach())
    T = routing.expert_idx_TK.shape[0]
    real = (
        # torch.full, not torch.tensor: no copy from host memory (a sync on CUDA)
        (torch.full((), T, device=routed_E.device) if token_mask_T is None else token_mask_T.sum())
        .clamp(min=1)
        .float()
    )
    counted_M = torch.ones_like(plan.token_idx_M, dtype=torch.float32)
    if plan.padding_T is not None:  # padding rows computed for nothing: not routes
        counted_M = (~plan.padding_T).to(torch.float32)[plan.token_idx_M]
    routed_T = torch.zeros(T, device=routed_E.device).index_add_(0, plan.token_idx_M, counted_M)
    unrouted_T = routed_T == 0 if token_mask_T is None else (routed_T == 0) & token_mask_T
    routed, kept = routed_E.sum().float(), kept_E.sum().float()
    return RoutingStats(
        tokens_per_expert=routed_E,
        kept_per_expert=kept_E,
        dropped_fraction=(routed - kept) / routed.clamp(min=1),
        router_entropy=router_entropy(routing.probs_TE, token_mask_T),
        capacity=plan.capacity,
        experts_per_token=plan.kept_per_expert_E.detach().sum().float() / real,
        unrouted_fraction=unrouted_T.sum().float() / real,
    )


def soft_routing_stats(
    routing: SoftRoutingResult, x_BSD: torch.Tensor, mask_BS: torch.Tensor | None
) -> RoutingStats:
    """Soft MoE's statistics: every expert processes its slots, nothing is dropped."""
    B, S = x_BSD.shape[:2]
    E = routing.combine_BSN.shape[-1] // routing.slots_per_expert
    slots_E = torch.full((E,), B * routing.slots_per_expert, device=x_BSD.device)
    combine_TN = routing.combine_BSN.reshape(-1, routing.combine_BSN.shape[-1])
    zero = x_BSD.new_zeros((), dtype=torch.float32)
    return RoutingStats(
        tokens_per_expert=slots_E,
        kept_per_expert=slots_E,
        dropped_fraction=zero,
        router_entropy=router_entropy(combine_TN, None if mask_BS is None else mask_BS.reshape(-1)),
        # expert evaluations per token: every slot is one expert call
        experts_per_token=zero + E * routing.slots_per_expert / S,
        unrouted_fraction=zero,
    )
