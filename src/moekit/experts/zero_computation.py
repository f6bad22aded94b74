"""Zero-computation experts (MoE++, Jin et al. 2024, arXiv:2410.07348; LongCat-Flash's identity
experts): router choices that cost almost nothing, so a token can use fewer real experts.

Legend: T = tokens, D = d_model, K = expert slots per token, C = constant experts.

The router scores ``E + zero + copy + constant`` experts; the slots that pick one of the
special ones skip the expert bank and add, times their router weight:

* **zero**: nothing (the slot is dropped);
* **copy**: the token itself, ``x`` (LongCat-Flash's "identity" experts);
* **constant**: ``a_1 x + a_2 v_c`` with ``[a_1, a_2] = softmax(W_c x)`` and a learned vector
  ``v_c`` (MoE++).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class ZeroComputationConfig:
    """How many of each zero-computation expert the router may choose (after the ``E`` real
    experts, in this order: zero, copy, constant).

    Args:
        zero: experts whose output is 0 (null experts: a slot that picks one costs nothing).
        copy: experts whose output is the input (identity).
        constant: experts whose output mixes the input with a learned vector (MoE++).
        target_experts_per_token: with zero experts and a top-k router, steer the average
            number of *real* experts per token to this value in training (an offset on the zero
            experts' selection scores, moved by ``offset_rate`` after each step;
            ``moekit.routing.null_slots``); ``None``: no controller (the offset stays 0 until
            ``moekit.set_compute_budget``).
        offset_rate: the controller's step.
    """

    zero: int = 0
    copy: int = 0
    constant: int = 0
    target_experts_per_token: float | None = None
    offset_rate: float = 1e-3

    def __post_init__(self) -> None:
        check_fields(self)
        if min(self.zero, self.copy, self.constant) < 0 or self.count < 1:
            raise ValueError(
                "zero_computation: zero, copy and constant must be >= 0 with at least one expert, "
                f"got {self.zero}, {self.copy}, {self.constant}"
            )
        if self.target_experts_per_token is not None and self.zero < 1:
            raise ValueError(
                "zero_computation.target_experts_per_token steers the zero experts: needs zero >= 1"
            )
        if self.target_experts_per_token is not None and self.target_experts_per_token < 0:
            raise ValueError(
                "zero_computation.target_experts_per_token must be >= 0, got "
                f"{self.target_experts_per_token}"
            )
        if self.offset_rate < 0:
            raise ValueError(f"zero_computation.offset_rate must be >= 0, got {self.offset_rate}")

    @property
    def count(self) -> int:
        return self.zero + self.copy + self.constant

    def build(self, *, d_model: int) -> ZeroComputationExperts:
        return ZeroComputationExperts(self, d_model=d_model)


class ZeroComputationExperts(nn.Module):
    """The special experts' contribution ``(T, D)`` for the slots that chose them.

    Parameters (constant experts only): ``vectors_CD`` (the ``v_c``) and ``gate_C2D`` (the
    ``W_c``), zero-initialised gate (``a = [1/2, 1/2]``) and small vectors.
    """

    def __init__(self, config: ZeroComputationConfig, *, d_model: int) -> None:
        super().__init__()
        self.config = config
        C = config.constant
        self.vectors_CD = nn.Parameter(torch.randn(C, d_model) * 0.02) if C else None
        self.gate_C2D = nn.Parameter(torch.zeros(C, 2, d_model)) if C else None

    def forward(
        self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor, first: int
    ) -> torch.Tensor:
        """Args:
        x_TD: the layer input.
        expert_idx_TK, weights_TK: the router's choices; indices ``>= first`` are special.
        first: E, the index of the first special expert.
        """
        cfg = self.config
        rel_TK = expert_idx_TK - first
        weights_TK = weights_TK.to(x_TD.dtype)
        copy_TK = (rel_TK >= cfg.zero) & (rel_TK < cfg.zero + cfg.copy)
        out_TD = (weights_TK * copy_TK).sum(dim=-1, keepdim=True) * x_TD
        if self.vectors_CD is not None and self.gate_C2D is not None:
            const_TK = rel_TK >= cfg.zero + cfg.copy
            which_TK = (rel_TK - cfg.zero - cfg.copy).clamp(0, cfg.constant - 1)
            w_TC = (
                F.one_hot(which_TK, cfg.constant).to(x_TD.dtype)
                * (weights_TK * const_TK).unsqueeze(-1)
            ).sum(dim=1)
            a_TC2 = torch.softmax(
                torch.einsum("td,cjd->tcj", x_TD, self.gate_C2D.to(x_TD.dtype)), -1
            )
            out_TD = out_TD + (w_TC * a_TC2[..., 0]).sum(-1, keepdim=True) * x_TD
            out_TD = out_TD + (w_TC * a_TC2[..., 1]) @ self.vectors_CD.to(x_TD.dtype)
        return out_TD
