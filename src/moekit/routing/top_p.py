"""Adaptive number of experts: top-p routing (Huang et al. 2024, "Harder Tasks Need More
Experts: Dynamic Routing in MoE Models").

``p = softmax(x W)``; a token takes the smallest set of its highest-probability experts whose
probabilities sum to at least ``top_p``, capped at ``top_k`` experts; weights are those
probabilities (renormalised over the chosen set when ``normalize_weights``). Confident tokens
use one expert, uncertain ("hard") tokens use more. Causal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.result import RoutingResult


@dataclass(kw_only=True)
class TopPRouterConfig(GateOptions, RouterOptions):
    """Adaptive number of experts per token (Huang et al. 2024): the smallest set whose
    probability mass reaches ``top_p``, at most ``top_k``.

    Args:
        top_p: probability mass the chosen experts must reach.
        normalize_weights: renormalise the chosen weights to sum 1.
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.TOP_P, init=False)
    top_p: float = 0.5
    normalize_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> TopPRouter:
        """The ``TopPRouter`` of this config."""
        return TopPRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class TopPRouter(GatedRouter):
    """``(T, D) -> RoutingResult`` with K = ``top_k`` slots, masked past each token's set."""

    def __init__(
        self, config: TopPRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        logits_TE = self.gate_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top = probs_TE.topk(self.top_k, dim=-1)
        mass_before_TK = top.values.detach().cumsum(dim=-1) - top.values.detach()
        mask_TK = mass_before_TK < self.config.top_p  # the first expert is always kept
        weights_TK = top.values * mask_TK
        if self.config.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RoutingResult(
            top.indices, weights_TK, logits_TE, probs_TE, assignment_mask_TK=mask_TK
        )
