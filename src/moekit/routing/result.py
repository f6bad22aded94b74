"""What every router returns.

Legend: T = tokens, E = experts, K = experts chosen per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class RoutingResult:
    """A router's decision for T tokens.

    Attributes:
        expert_idx_TK: ``(T, K)`` long, the chosen experts of each token.
        weights_TK: ``(T, K)`` combine weights (differentiable; router dtype).
        logits_TE: ``(T, E)`` logits used for the choice (noisy ones under noisy gating).
        probs_TE: ``(T, E)`` the router's full distribution over experts (rows sum to 1), what
            the balancing losses measure: softmax of the logits, or normalised sigmoid scores.
        clean_logits_TE: ``(T, E)`` logits before noise (noisy gating only, for the load loss).
        noise_std_TE: ``(T, E)`` noise standard deviation (noisy gating only).
        assignment_mask_TK: ``(T, K)`` bool, ``False`` for a slot that holds no assignment
            (routers whose tokens take a variable number of experts: expert choice, top-p,
            GShard's random second expert, ...); ``None`` means every slot is used.
    """

    expert_idx_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    clean_logits_TE: torch.Tensor | None = None
    noise_std_TE: torch.Tensor | None = None
    assignment_mask_TK: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return self.expert_idx_TK.shape[-1]

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]


@runtime_checkable
class Router(Protocol):
    """What every token-choice or batch-level router is: ``(T, D) -> RoutingResult``.

    Attributes:
        num_experts: E.
        top_k: expert slots per token in the result (K; E for routers whose tokens take a
            variable number of experts, with ``assignment_mask_TK`` marking the used ones).
        causal: whether a token's routing never depends on later tokens (a causal language
            model refuses the others).

    Call: ``router(x_TD, token_ids_T=None, token_mask_T=None)``: token ids for routers that
    route by id (hash), the padding mask (``True`` = real token) for routers whose decision
    depends on the batch (expert choice, BASE), so padding never takes a real token's slot.
    Soft MoE's router is not a ``Router``: it mixes whole sequences (``SoftMoERouter``).
    """

    num_experts: int
    top_k: int
    causal: bool

    def __call__(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult: ...
