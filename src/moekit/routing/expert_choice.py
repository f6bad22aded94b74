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

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.result import RoutingResult
from moekit.utils.capacity import capacity_for


@dataclass(kw_only=True)
class ExpertChoiceRouterConfig(GateOptions, RouterOptions):
    """Expert-choice routing (Zhou et al. 2022).

    Args:
        capacity_factor: the paper's capacity factor ``c``, the average number of experts per
            token: each expert takes ``ceil(c T / E)`` tokens.
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.EXPERT_CHOICE, init=False)
    causal: ClassVar[bool] = False  # experts choose among all tokens of the batch
    capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> ExpertChoiceRouter:
        """The ``ExpertChoiceRouter`` of this config."""
        return ExpertChoiceRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class ExpertChoiceRouter(GatedRouter):
    """``(T, D) -> RoutingResult``: K = E slots per token, masked to the experts that chose it."""

    def __init__(
        self, config: ExpertChoiceRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.top_k = num_experts

    def tokens_per_expert(self, num_tokens: int) -> int:
        """Tokens each expert picks from ``num_tokens``: ``ceil(c T / E)``, at most T."""
        return capacity_for(self.config.capacity_factor, num_tokens, self.num_experts)

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        logits_TE = self.gate_logits(x_TD)
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
