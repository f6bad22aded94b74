"""Balanced assignment routing (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large,
Sparse Models").

In training, tokens are assigned to experts so that every expert gets exactly ``T / E`` tokens
(``floor`` or ``ceil`` when E does not divide T) while maximising the summed router scores
``x_t . w_e``: a linear assignment problem. Small batches (``T <=
exact_assignment_max_tokens``) are solved exactly with ``scipy.optimize.linear_sum_assignment``
on the token x expert-slot matrix; larger ones with Sinkhorn iterations (entropic optimal
transport toward the balanced marginals) followed by a capacity-respecting rounding. At
inference each token takes its best expert (greedy top-1). The expert output is scaled by
``sigmoid(x_t . w_e)``, as in the paper.

Not causal in training (the assignment depends on the whole batch), so a causal language model
refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.result import RoutingResult


def balanced_capacities(num_tokens: int, num_experts: int) -> list[int]:
    base, extra = divmod(num_tokens, num_experts)
    return [base + (1 if e < extra else 0) for e in range(num_experts)]


def exact_balanced_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """Expert per token maximising the total score with balanced loads (Hungarian method)."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (optional: scipy)

    T, E = scores_TE.shape
    slots_expert = torch.repeat_interleave(torch.arange(E), torch.tensor(balanced_capacities(T, E)))
    cost = -scores_TE.detach().double().cpu()[:, slots_expert]  # (T, T): token x expert slot
    rows, cols = linear_sum_assignment(cost.numpy())
    expert_T = torch.empty(T, dtype=torch.long)
    expert_T[torch.as_tensor(rows)] = slots_expert[torch.as_tensor(cols)]
    return expert_T.to(scores_TE.device)


def sinkhorn_balanced_assignment(scores_TE: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximately optimal balanced assignment: Sinkhorn plan, then capacity-aware rounding.

    Rounds are vectorised: every unassigned token proposes to its best expert with room left;
    each expert accepts its highest-plan proposers up to its remaining capacity.
    """
    T, E = scores_TE.shape
    capacity_E = torch.tensor(balanced_capacities(T, E), device=scores_TE.device)
    log_plan = scores_TE.detach().double()
    log_plan = (log_plan - log_plan.mean()) / log_plan.std().clamp(min=1e-6)
    log_cols = torch.log(capacity_E.double() / T)
    for _ in range(iterations):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)  # rows sum to 1
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True) + log_cols
    expert_T = torch.full((T,), -1, dtype=torch.long, device=scores_TE.device)
    remaining_E = capacity_E.clone()
    while (expert_T < 0).any():
        open_E = remaining_E > 0
        free_T = expert_T < 0
        masked = log_plan.masked_fill(~open_E.unsqueeze(0), float("-inf"))
        proposal_T = masked.argmax(dim=1)
        bid_T = masked.gather(1, proposal_T.unsqueeze(1)).squeeze(1)
        for e in torch.unique(proposal_T[free_T]).tolist():  # at most E experts per round
            bidders = torch.nonzero(free_T & (proposal_T == e)).flatten()
            take = min(int(remaining_E[e]), len(bidders))
            winners = bidders[bid_T[bidders].topk(take).indices]
            expert_T[winners] = e
            remaining_E[e] -= take
    return expert_T


def _one_expert_per_token(kind: RouterKind, top_k: int) -> None:
    if top_k != 1:
        raise ValueError(f"kind={kind.value!r} routes each token to one expert: top_k=1")


@dataclass(kw_only=True)
class BaseRouterConfig(GateOptions, RouterOptions):
    """Balanced assignment (BASE layers, Lewis et al. 2021).

    Args:
        exact_assignment_max_tokens: solve exactly (Hungarian) up to this many tokens,
            Sinkhorn above.
        sinkhorn_iterations: Sinkhorn iterations for large batches.
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.BASE, init=False)
    causal: ClassVar[bool] = False  # the assignment balances the whole batch
    exact_assignment_max_tokens: int = 512
    sinkhorn_iterations: int = 50

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        _one_expert_per_token(self.kind, top_k)

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> BalancedAssignmentRouter:
        """The ``BalancedAssignmentRouter`` of this config."""
        return BalancedAssignmentRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class BalancedAssignmentRouter(GatedRouter):
    """``(T, D) -> RoutingResult`` with K = 1: balanced in training, greedy at inference."""

    def __init__(
        self, config: BaseRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        logits_TE = self.gate_logits(x_TD)
        expert_T = logits_TE.argmax(dim=-1)  # inference, and padding (which is never dispatched)
        if self.training:
            # only real tokens share the balanced slots
            real_R = (
                torch.arange(len(x_TD), device=x_TD.device)
                if token_mask_T is None
                else torch.nonzero(token_mask_T).flatten()
            )
            expert_T = expert_T.index_put((real_R,), self._balanced(logits_TE[real_R]))
        expert_idx_TK = expert_T.unsqueeze(1)
        weights_TK = torch.sigmoid(logits_TE.gather(1, expert_idx_TK))
        return RoutingResult(expert_idx_TK, weights_TK, logits_TE, torch.softmax(logits_TE, -1))

    def _balanced(self, logits_RE: torch.Tensor) -> torch.Tensor:
        """Balanced expert per real token: exact for small batches, Sinkhorn above."""
        if len(logits_RE) == 0:
            return logits_RE.new_zeros(0, dtype=torch.long)
        if len(logits_RE) <= self.config.exact_assignment_max_tokens:
            try:
                return exact_balanced_assignment(logits_RE)
            except ImportError:  # scipy missing: the Sinkhorn path is still balanced
                pass
        return sinkhorn_balanced_assignment(logits_RE, self.config.sinkhorn_iterations)
