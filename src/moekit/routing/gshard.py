"""GShard top-2 gating with random routing of the second expert (Lepikhin et al. 2020, Alg. 1).

``g = softmax(x W)``; the best two experts get weights ``g1, g2`` normalised by ``g1 + g2``; in
training the second expert is kept only with probability ``min(1, 2 g2)`` (so weak second
choices are usually skipped and save capacity); a skipped second expert contributes nothing
(the first keeps its weight ``g1``). In eval, or with ``second_expert_policy='all'``, both run.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.routing.config import GShardRouterConfig, SecondExpertPolicy
from moekit.routing.projection import linear_logits, new_router_weight
from moekit.routing.result import RoutingResult


class GShardTop2Router(nn.Module):
    """``(T, D) -> RoutingResult`` with K = 2 and a mask on skipped second experts."""

    causal = True

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, config: GShardRouterConfig
    ) -> None:
        super().__init__()
        self.config, self.d_model, self.num_experts, self.top_k = config, d_model, num_experts, 2
        self.weight_ED, self.bias_E = new_router_weight(d_model, num_experts, bias=config.bias)

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        logits_TE = linear_logits(x_TD, self.weight_ED, self.bias_E, self.config.float32)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top = probs_TE.topk(2, dim=-1)
        weights_TK = top.values / top.values.sum(dim=-1, keepdim=True)
        mask_TK = None
        if self.training and self.config.second_expert_policy is SecondExpertPolicy.RANDOM:
            second_T = weights_TK.select(1, 1).detach()
            keep_second_T = torch.rand_like(second_T) < 2.0 * second_T
            mask_TK = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=-1)
        return RoutingResult(
            top.indices, weights_TK, logits_TE, probs_TE, assignment_mask_TK=mask_TK
        )
