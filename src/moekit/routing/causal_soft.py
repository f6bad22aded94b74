"""Causal Soft MoE: slots mixed from past tokens only (an attempt at what seed 003 calls an
open problem for autoregressive models).

Soft MoE (``moekit.routing.soft``) gives each slot a convex mix of *all* of a sequence's
tokens. Here the slot a token at position ``t`` reads is a convex mix of the tokens up to
``t`` (a prefix softmax over positions):

    w[i, n] = exp(logit[i, n] − |scale|)                  (B, S, N): unnormalised, no overflow
    slot[t, n] = Σ_{i≤t} w[i, n] x_i / Σ_{i≤t} w[i, n]      (B, S, N, D): causal slots
    y_t = Σ_n softmax_n(logit[t, :]) · f_{e(n)}(slot[t, n])

Logits are Soft MoE's (``l2norm(x) · scale · l2norm(φ)``, so ``|logit| ≤ |scale|``); subtracting
``|scale|`` instead of a running maximum keeps every position's arithmetic independent of later
tokens. The price: Soft MoE runs each expert on ``P`` slots per *sequence*, this on ``P`` slots
per *token* — every token computes all ``N = E·P`` slot outputs, so at equal compute per token
its experts are ``1/N`` as wide as a top-1 MoE's. Decoding needs the prefix sums as state; a
KV-cached decode is refused (``generate(..., use_cache=False)`` recomputes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from moekit.routing.config import RouterKind
from moekit.routing.projection import router_dtype
from moekit.routing.soft import SoftMoERouter, SoftRouterConfig, SoftRoutingResult


@dataclass(kw_only=True)
class CausalSoftRouterConfig(SoftRouterConfig):
    """Causal Soft MoE: slots as prefix mixes of the tokens so far.

    Args:
        slots_per_expert: slots each expert processes per token.
        float32: compute the router in at least float32.
    """

    kind: RouterKind = field(default=RouterKind.CAUSAL_SOFT, init=False)
    causal: ClassVar[bool] = True  # a slot at position t mixes tokens 0..t only

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> CausalSoftMoERouter:
        """The ``CausalSoftMoERouter`` of this config."""
        return CausalSoftMoERouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class CausalSoftMoERouter(SoftMoERouter):
    """``(B, S, D) -> SoftRoutingResult`` whose ``dispatch_BSN`` holds the unnormalised prefix
    weights ``w`` (padding 0); ``combine_BSN`` is Soft MoE's."""

    def forward(
        self, x_BSD: torch.Tensor, token_mask_BS: torch.Tensor | None = None
    ) -> SoftRoutingResult:
        dtype = router_dtype(x_BSD, self.config.float32)
        x = F.normalize(x_BSD.to(dtype), dim=-1)
        scale = self.scale.to(dtype)
        logits_BSN = x @ (scale * F.normalize(self.phi_DN.to(dtype), dim=0))
        weights_BSN = torch.exp(logits_BSN - scale.abs().detach())
        if token_mask_BS is not None:
            weights_BSN = weights_BSN * token_mask_BS.unsqueeze(-1).to(dtype)
        combine_BSN = torch.softmax(logits_BSN, dim=-1)
        return SoftRoutingResult(weights_BSN, combine_BSN, logits_BSN, self.slots_per_expert)
