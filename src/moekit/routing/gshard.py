"""GShard top-2 gating with random routing of the second expert (Lepikhin et al. 2020, Alg. 1).

``g = softmax(x W)``; the best two experts get weights ``g1, g2`` normalised by ``g1 + g2``; in
training the second expert is kept only with probability ``min(1, 2 g2)`` (so weak second
choices are usually skipped and save capacity); a skipped second expert contributes nothing
(the first keeps its weight ``g1``). In eval, or with ``second_expert_policy='all'``, both run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.result import RoutingResult
from moekit.utils.randomness import uniform_like


class SecondExpertPolicy(str, Enum):
    """GShard's second expert in training."""

    RANDOM = "random"  # kept with probability min(1, 2 g2)
    ALL = "all"  # always kept


@dataclass(kw_only=True)
class GShardRouterConfig(GateOptions, RouterOptions):
    """GShard's top-2 (Lepikhin et al. 2020).

    Args:
        second_expert_policy: ``random`` (keep expert 2 with probability ``min(1, 2 g2)`` in
            training) or ``all``.
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.GSHARD_TOP2, init=False)
    second_expert_policy: SecondExpertPolicy = SecondExpertPolicy.RANDOM

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        if top_k != 2:
            raise ValueError(f"kind='gshard_top2' needs top_k=2, got {top_k}")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> GShardTop2Router:
        """The ``GShardTop2Router`` of this config."""
        return GShardTop2Router(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class GShardTop2Router(GatedRouter):
    """``(T, D) -> RoutingResult`` with K = 2 and a mask on skipped second experts."""

    def __init__(
        self, config: GShardRouterConfig, *, d_model: int, num_experts: int, top_k: int
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
        top = probs_TE.topk(2, dim=-1)
        weights_TK = top.values / top.values.sum(dim=-1, keepdim=True)
        mask_TK = None
        if self.training and self.config.second_expert_policy is SecondExpertPolicy.RANDOM:
            second_T = weights_TK.select(1, 1).detach()
            keep_second_T = uniform_like(second_T, self, "second") < 2.0 * second_T
            mask_TK = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=-1)
        return RoutingResult(
            top.indices, weights_TK, logits_TE, probs_TE, assignment_mask_TK=mask_TK
        )
