"""Dense softmax gating: every expert runs, ``y = sum_i alpha_i(x) E_i(x)``.

The classic mixture of experts (Jacobs et al. 1991) with a linear gate ``alpha = softmax(x W)``,
or, with ``gate_hidden > 0``, the gating network of Eigen, Ranzato & Sutskever 2013 ("Learning
Factored Representations in a Deep Mixture of Experts"): ``alpha = softmax(W2 relu(W1 x))``.
Nothing is dropped and nothing is sparse: the cost is E experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.config import GateOptions, RouterBase, RouterKind, RouterOptions
from moekit.routing.projection import linear_logits, new_router_weight, router_dtype
from moekit.routing.result import RoutingResult


@dataclass(kw_only=True)
class DenseRouterConfig(GateOptions, RouterOptions):
    """Every expert, softmax weights (the classic mixture; Eigen et al. 2013's MLP gate).

    Args:
        gate_hidden: 0 for a linear gate, else the hidden width of a linear-ReLU-linear gate.
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.DENSE, init=False)
    gate_hidden: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate_hidden < 0:
            raise ValueError(f"gate_hidden must be >= 0, got {self.gate_hidden}")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> DenseGateRouter:
        """The ``DenseGateRouter`` of this config."""
        return DenseGateRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class DenseGateRouter(RouterBase):
    """``(T, D) -> RoutingResult`` with all E experts per token (K = E)."""

    def __init__(
        self, config: DenseRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.top_k = num_experts
        width = config.gate_hidden or d_model
        self.hidden = nn.Linear(d_model, config.gate_hidden) if config.gate_hidden else None
        self.weight_ED, self.bias_E = new_router_weight(width, num_experts, bias=config.bias)

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        h_TD = x_TD
        if self.hidden is not None:
            dtype = router_dtype(x_TD, self.config.float32)
            h_TD = F.relu(
                F.linear(x_TD.to(dtype), self.hidden.weight.to(dtype), self.hidden.bias.to(dtype))
            )
        logits_TE = linear_logits(h_TD, self.weight_ED, self.bias_E, self.config.float32)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        expert_idx_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        return RoutingResult(expert_idx_TK, probs_TE, logits_TE, probs_TE)
