"""Per-call routing statistics of an MoE layer: cheap enough to leave on.

Legend: T = tokens, E = experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
