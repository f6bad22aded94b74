"""Soft MoE routing (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Legend: B = sequences, S = tokens per sequence, D = d_model, E = experts, P = slots per expert,
N = E * P slots.

``logits = l2norm(X) . (scale * l2norm(Phi))`` gives ``(B, S, N)``; dispatch weights are a
softmax over the tokens of each slot (each slot's input is a convex mix of the sequence's
tokens), combine weights a softmax over the slots of each token (each token's output is a
convex mix of the slot outputs). Every token gets output, nothing is dropped, no balancing loss
is needed. ``scale`` is the paper's learnable scalar (initialised to 1).

Not causal: every slot mixes all tokens of the sequence, later ones included (the seeds call a
causal Soft MoE an open problem), so a causal language model refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.config import RouterBase, RouterKind, RouterOptions
from moekit.routing.projection import router_dtype


@dataclass
class SoftRoutingResult:
    """Soft MoE weights for B sequences of S tokens.

    Attributes:
        dispatch_BSN: ``(B, S, N)``, columns (over S) sum to 1 for each slot.
        combine_BSN: ``(B, S, N)``, rows (over N) sum to 1 for each token.
        logits_BSN: ``(B, S, N)`` the normalised router logits.
        slots_per_expert: P.
    """

    dispatch_BSN: torch.Tensor
    combine_BSN: torch.Tensor
    logits_BSN: torch.Tensor
    slots_per_expert: int


@dataclass(kw_only=True)
class SoftRouterConfig(RouterOptions):
    """Soft MoE (Puigcerver et al. 2023).

    Args:
        slots_per_expert: slots each expert processes per sequence.
        float32: compute the router in at least float32 (``GateOptions``).
    """

    kind: RouterKind = field(default=RouterKind.SOFT, init=False)
    causal: ClassVar[bool] = False  # slots mix every token of a sequence
    slots_per_expert: int = 1
    float32: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {self.slots_per_expert}")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> SoftMoERouter:
        """The ``SoftMoERouter`` of this config."""
        return SoftMoERouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class SoftMoERouter(RouterBase):
    """``(B, S, D) -> SoftRoutingResult``; parameters ``phi_DN`` and ``scale``."""

    soft = True

    def __init__(
        self, config: SoftRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.top_k = config.slots_per_expert
        self.slots_per_expert = config.slots_per_expert
        slots = num_experts * config.slots_per_expert
        self.phi_DN = nn.Parameter(torch.randn(d_model, slots) / d_model**0.5)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(
        self, x_BSD: torch.Tensor, token_mask_BS: torch.Tensor | None = None
    ) -> SoftRoutingResult:
        dtype = router_dtype(x_BSD, self.config.float32)
        x = F.normalize(x_BSD.to(dtype), dim=-1)
        phi = self.scale.to(dtype) * F.normalize(self.phi_DN.to(dtype), dim=0)
        logits_BSN = x @ phi
        dispatch_logits = logits_BSN
        if token_mask_BS is not None:
            # a sequence with no real token keeps its logits (instead of a softmax over all
            # -inf, which is NaN); the layer zeroes the outputs of its padding anyway
            masked_BS = ~token_mask_BS & token_mask_BS.any(dim=1, keepdim=True)
            dispatch_logits = logits_BSN.masked_fill(masked_BS.unsqueeze(-1), float("-inf"))
        dispatch_BSN = torch.softmax(dispatch_logits, dim=1)
        combine_BSN = torch.softmax(logits_BSN, dim=-1)
        return SoftRoutingResult(dispatch_BSN, combine_BSN, logits_BSN, self.slots_per_expert)
