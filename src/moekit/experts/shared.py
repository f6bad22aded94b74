"""Shared experts: always-on FFNs added to the routed output (DeepSeekMoE, Dai et al. 2024),
optionally scaled by a sigmoid gate of the input (Qwen2-MoE).

Legend: T = tokens, D = d_model, H = shared hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.experts.activations import Activation
from moekit.experts.dense import FeedForward
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class SharedExpertConfig:
    """Always-on experts, fused into one FFN of hidden width ``hidden`` (n shared experts of
    width h are one FFN of width n*h).

    Args:
        hidden: total hidden width of the shared experts.
        activation: as for routed experts.
        bias: projection biases.
        gated: scale the output by ``sigmoid(x w_gate)`` (Qwen2-MoE's ``shared_expert_gate``).
    """

    hidden: int
    activation: Activation = Activation.SWIGLU
    bias: bool = False
    gated: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden < 1:
            raise ValueError(f"shared expert hidden must be >= 1, got {self.hidden}")

    def build(self, *, d_model: int) -> SharedExperts:
        """The shared experts of width ``d_model``."""
        return SharedExperts(d_model, self)


class SharedExperts(nn.Module):
    """``(T, D) -> (T, D)``: ``ffn(x)``, or ``sigmoid(x w_gate) * ffn(x)`` when gated."""

    def __init__(self, d_model: int, config: SharedExpertConfig) -> None:
        super().__init__()
        self.ffn = FeedForward(
            d_model, config.hidden, activation=config.activation, bias=config.bias
        )
        self.gate = nn.Linear(d_model, 1, bias=False) if config.gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.ffn(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD
