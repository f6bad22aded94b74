"""Dense feed-forward network: the baseline an expert is measured against, and the shared expert.

Legend: D = d_model, H = hidden width.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from moekit.experts.activations import Activation, apply_activation, in_projection_width


class DenseAdapter(Protocol):
    """What a dense FFN's adapter adds to each projection (``moekit.adapters.lora``)."""

    @property
    def active(self) -> bool:
        """False once merged into the weights."""
        ...

    def in_delta(self, x: torch.Tensor) -> torch.Tensor: ...

    def out_delta(self, a: torch.Tensor) -> torch.Tensor: ...


class FeedForward(nn.Module):
    """``w_out(act(w_in(x)))`` on ``(..., D) -> (..., D)``; gated activations use ``[gate | up]``.

    Weights are stored like the expert bank's (``w_in_DH`` ``(D, H or 2H)``, ``w_out_HD``
    ``(H, D)``), so an expert and a dense FFN can share weights without transposes.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        activation: Activation | str = Activation.SWIGLU,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if d_model < 1 or hidden < 1:
            raise ValueError(f"d_model and hidden must be >= 1, got {d_model} and {hidden}")
        self.d_model = d_model
        self.hidden = hidden
        self.activation = Activation(activation)
        width = in_projection_width(self.activation, hidden)
        self.w_in_DH = nn.Parameter(torch.empty(d_model, width))
        self.w_out_HD = nn.Parameter(torch.empty(hidden, d_model))
        self.b_in_H = nn.Parameter(torch.empty(width)) if bias else None
        self.b_out_D = nn.Parameter(torch.empty(d_model)) if bias else None
        # a low-rank adapter on both projections (``moekit.adapters.lora.DenseLoRA``), or None
        self.adapter: DenseAdapter | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weights as ``nn.Linear`` would: uniform in +-1/sqrt(fan_in)."""
        bound_in, bound_out = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.hidden)
        nn.init.uniform_(self.w_in_DH, -bound_in, bound_in)
        nn.init.uniform_(self.w_out_HD, -bound_out, bound_out)
        if self.b_in_H is not None and self.b_out_D is not None:
            nn.init.uniform_(self.b_in_H, -bound_in, bound_in)
            nn.init.uniform_(self.b_out_D, -bound_out, bound_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter if self.adapter is not None and self.adapter.active else None
        h = x @ self.w_in_DH
        if self.b_in_H is not None:
            h = h + self.b_in_H
        if adapter is not None:
            h = h + adapter.in_delta(x)
        a = apply_activation(self.activation, h)
        y = a @ self.w_out_HD
        if self.b_out_D is not None:
            y = y + self.b_out_D
        if adapter is not None:
            y = y + adapter.out_delta(a)
        return y
