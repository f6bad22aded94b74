"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

``S = softmax(x W)`` over experts for each token; each expert then takes the ``c_e =
ceil(c T / E)`` tokens with the highest score for it (``c`` = ``capacity_factor``, the average
number of experts per token). Load is balanced by construction; a token may be picked by 0..E
experts, and one picked by none passes through on the residual. Its combine weight for an expert
is its score ``S[t, e]``.

Not causal: whether a token is picked depends on the scores of every other token in the batch,
later ones included, so a causal language model refuses it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.routing.config import ExpertChoiceRouterConfig
from moekit.routing.projection import linear_logits, new_router_weight
from moekit.routing.result import RoutingResult


class ExpertChoiceRouter(nn.Module):
    """``(T, D) -> RoutingResult``: K = E slots per token, masked to the experts that chose it."""

    causal = False

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, config: ExpertChoiceRouterConfig
    ) -> None:
        super().__init__()
        self.config, self.d_model, self.num_experts = config, d_model, num_experts
        self.top_k = num_experts
        self.weight_ED, self.bias_E = new_router_weight(d_model, num_experts, bias=config.bias)

    def tokens_per_expert(self, num_tokens: int) -> int:
        return min(
            num_tokens, math.ceil(self.config.capacity_factor * num_tokens / self.num_experts)
        )

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        logits_TE = linear_logits(x_TD, self.weight_ED, self.bias_E, self.config.float32)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        # padding never competes for an expert's slots, nor counts toward their number
        real = T if token_mask_T is None else int(token_mask_T.sum())
        choice_TE = probs_TE.detach()
        if token_mask_T is not None:
            choice_TE = choice_TE.masked_fill(~token_mask_T.unsqueeze(1), -1.0)
        chosen_EC = choice_TE.t().topk(self.tokens_per_expert(real), dim=-1).indices
        mask_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        mask_TE.scatter_(0, chosen_EC.t(), True)
        expert_idx_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        return RoutingResult(
            expert_idx_TK, probs_TE, logits_TE, probs_TE, assignment_mask_TK=mask_TE
        )
