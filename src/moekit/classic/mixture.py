"""The adaptive mixture of local experts (Jacobs, Jordan, Nowlan & Hinton 1991).

Legend: N = samples, I = inputs, K = experts, Q = regression outputs or C classes.

K expert networks (linear, or one hidden layer) and a softmax gating network over the *input*;
every expert runs on every sample (dense gating). Two error functions from the paper:

* cooperative: the error of the blended output, ``||y - sum_i g_i o_i||^2``; the experts
  cooperate, each compensating the others' errors;
* competitive: ``-log sum_i g_i exp(-||y - o_i||^2 / 2 sigma^2)`` (the negative log of the
  gate-weighted Gaussian likelihoods); an expert is pulled toward a sample in proportion to its
  posterior responsibility, so the experts specialise. With ``learn_variance`` each expert has
  its own sigma and the normalising constant is kept.

Classification uses softmax experts: cooperative = squared error between the one-hot target and
the blended class probabilities, competitive = ``-log sum_i g_i p_i(y)``.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from moekit.utils.validation import coerce


class ErrorFunction(str, Enum):
    COOPERATIVE = "cooperative"
    COMPETITIVE = "competitive"


class MixtureOfLocalExperts(nn.Module):
    """``x (N, I) -> (gates (N, K), expert outputs (N, K, Q or C))``.

    Args:
        n_inputs: I.
        n_outputs: Q regression outputs or C classes.
        n_experts: K.
        classification: softmax experts (outputs are logits) instead of Gaussian ones.
        expert_hidden: 0 for linear experts, else the hidden width of one-hidden-layer experts.
        gate_hidden: 0 for a linear gate (the paper's), else a one-hidden-layer gate.
        learn_variance: each Gaussian expert learns its variance (competitive error).
    """

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        n_experts: int,
        *,
        classification: bool = False,
        expert_hidden: int = 0,
        gate_hidden: int = 0,
        learn_variance: bool = False,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts, self.classification = n_experts, classification
        self.experts = nn.ModuleList(
            _network(n_inputs, n_outputs, expert_hidden) for _ in range(n_experts)
        )
        self.gate = _network(n_inputs, n_experts, gate_hidden)
        self.log_variance_K = (
            nn.Parameter(torch.zeros(n_experts)) if learn_variance and not classification else None
        )

    def forward(self, x_NI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates_NK = torch.softmax(self.gate(x_NI), dim=-1)
        outputs_NKQ = torch.stack([expert(x_NI) for expert in self.experts], dim=1)
        return gates_NK, outputs_NKQ

    def predict(self, x_NI: torch.Tensor) -> torch.Tensor:
        """The blended output: ``(N, Q)`` for regression, ``(N, C)`` class probabilities."""
        gates_NK, outputs_NKQ = self(x_NI)
        if self.classification:
            outputs_NKQ = torch.softmax(outputs_NKQ, dim=-1)
        return (gates_NK.unsqueeze(-1) * outputs_NKQ).sum(dim=1)

    def loss(self, x_NI: torch.Tensor, y: torch.Tensor, error: ErrorFunction | str) -> torch.Tensor:
        """Mean error over samples; ``y`` is ``(N, Q)`` targets or ``(N,)`` class labels."""
        gates_NK, outputs_NKQ = self(x_NI)
        if coerce(error, ErrorFunction, "error") is ErrorFunction.COOPERATIVE:
            return cooperative_error(gates_NK, outputs_NKQ, y, self.classification)
        return competitive_error(gates_NK, outputs_NKQ, y, self.classification, self.log_variance_K)


def _network(n_in: int, n_out: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(n_in, n_out)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def cooperative_error(
    gates_NK: torch.Tensor, outputs_NKQ: torch.Tensor, y: torch.Tensor, classification: bool
) -> torch.Tensor:
    """``mean_n ||y_n - sum_i g_i o_i||^2`` (class probabilities against one-hot targets)."""
    if classification:
        outputs_NKQ = torch.softmax(outputs_NKQ, dim=-1)
        y = F.one_hot(y.long(), outputs_NKQ.shape[-1]).to(outputs_NKQ.dtype)
    blended_NQ = (gates_NK.unsqueeze(-1) * outputs_NKQ).sum(dim=1)
    return ((y - blended_NQ) ** 2).sum(dim=-1).mean()


def competitive_error(
    gates_NK: torch.Tensor,
    outputs_NKQ: torch.Tensor,
    y: torch.Tensor,
    classification: bool,
    log_variance_K: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_n -log sum_i g_i P_i(y_n)`` with Gaussian (sigma = 1 unless learned) or softmax
    experts; computed in log space."""
    if classification:
        log_p_NK = torch.log_softmax(outputs_NKQ, dim=-1).gather(
            2, y.long().view(-1, 1, 1).expand(-1, outputs_NKQ.shape[1], 1)
        )[..., 0]
    else:
        sq_NK = ((y.unsqueeze(1) - outputs_NKQ) ** 2).sum(dim=-1)
        if log_variance_K is None:  # the paper's fixed unit variance, constants dropped
            log_p_NK = -0.5 * sq_NK
        else:
            Q = outputs_NKQ.shape[-1]
            log_p_NK = -0.5 * (
                sq_NK / log_variance_K.exp() + Q * (log_variance_K + math.log(2 * math.pi))
            )
    log_mix_N = torch.logsumexp(torch.log(gates_NK.clamp(min=1e-30)) + log_p_NK, dim=1)
    return -log_mix_N.mean()
