"""Hierarchical mixture of experts trained by EM (Jordan & Jacobs 1994, "Hierarchical Mixtures of
Experts and the EM Algorithm").

Legend: N = samples, P = inputs + 1 (bias column), B = branching, D = depth, L = B^D leaves
(experts), Q = regression outputs, C = classes.

A tree of softmax gates over the input: the root splits into B branches, each branch's gate
into B more, D levels deep; the L leaves are generalised linear experts (Gaussian for
regression, softmax for classification). ``P(y|x) = sum_leaf g_leaf(x) P_leaf(y|x)`` with
``g_leaf`` the product of the gate probabilities along the leaf's path.

EM: the E-step gives each sample's posterior over leaves, ``h_leaf ∝ g_leaf P_leaf(y|x)``, and
from it every node's posterior and its children's conditional posteriors; the M-step fits each
expert by weighted least squares (Gaussian) or weighted multinomial IRLS (softmax), weights
``h_leaf``, and each gate by weighted multinomial IRLS toward its children's posteriors,
weights the node's posterior. Each M-step piece never lowers its part of the expected complete
log-likelihood, so the (ridge-penalised) log-likelihood never decreases (tested). The model is a
``torch.nn.Module`` too: ``log_likelihood`` is differentiable, for gradient training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from moekit.classic.glm import (
    softmax_with_reference,
    weighted_least_squares,
    weighted_softmax_irls,
    with_bias,
)


class ExpertKind(str, Enum):
    """The HME's experts: Gaussian (regression) or softmax (classification) GLMs."""

    GAUSSIAN = "gaussian"  # regression: y ~ N(x W, variance I)
    SOFTMAX = "softmax"  # classification: y ~ Categorical(softmax(x W))


@dataclass
class EMHistory:
    """Per iteration of :meth:`HME.fit_em`: the objective (log-likelihood minus the ridge
    penalty) and the plain log-likelihood, both summed over samples."""

    objective: list[float]
    log_likelihood: list[float]


class HME(nn.Module):
    """``x (N, P-1) -> `` leaf probabilities and expert outputs; see the module docstring.

    Args:
        n_inputs: input features (P - 1).
        n_outputs: Q regression outputs, or C classes.
        kind: ``gaussian`` or ``softmax`` experts.
        depth: D gate levels (1 = the classic one-level mixture of experts).
        branching: B children per gate.
        ridge: L2 penalty of the IRLS fits (gates and softmax experts).
        generator: random initialisation.
    """

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        *,
        kind: ExpertKind | str = ExpertKind.GAUSSIAN,
        depth: int = 1,
        branching: int = 2,
        ridge: float = 1e-4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if depth < 1 or branching < 1:
            raise ValueError(f"depth and branching must be >= 1, got {depth} and {branching}")
        self.kind = ExpertKind(kind)
        if self.kind is ExpertKind.SOFTMAX and n_outputs < 2:
            raise ValueError(f"a softmax expert needs >= 2 classes, got {n_outputs}")
        self.depth, self.branching, self.ridge = depth, branching, ridge
        self.n_leaves = branching**depth
        P = n_inputs + 1
        init = 0.1 / math.sqrt(P)

        def param(*shape: int) -> nn.Parameter:
            t = torch.randn(*shape, generator=generator, dtype=torch.float64)
            return nn.Parameter(t * init)

        # gates of level l: (B^l nodes, P, B-1), the last child is each gate's reference
        self.gates = nn.ParameterList(
            [param(branching**lv, P, branching - 1) for lv in range(depth)]
        )
        width = n_outputs if self.kind is ExpertKind.GAUSSIAN else n_outputs - 1
        self.experts = param(self.n_leaves, P, width)
        # Gaussian experts: log-variance per leaf (learned by EM or gradient)
        self.log_variance = nn.Parameter(torch.zeros(self.n_leaves, dtype=torch.float64))

    # ---- the model ---------------------------------------------------------------------------

    def leaf_probabilities(self, x_NP: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` prior of each leaf: the product of gate probabilities on its path."""
        path_NL = x_NP.new_ones(x_NP.shape[0], 1)
        for W_JPB1 in self.gates:
            probs_NJB = torch.stack(
                [softmax_with_reference(x_NP, W_PB1) for W_PB1 in W_JPB1], dim=1
            )
            path_NL = (path_NL.unsqueeze(2) * probs_NJB).flatten(1)
        return path_NL

    def leaf_log_likelihood(self, x_NP: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` ``log P_leaf(y_n | x_n)``; ``y`` is ``(N, Q)`` targets or ``(N,)`` labels."""
        if self.kind is ExpertKind.GAUSSIAN:
            mean_NLQ = torch.einsum("np,lpq->nlq", x_NP, self.experts)
            Q = mean_NLQ.shape[2]
            var_L = self.log_variance.exp()
            sq_NL = ((y.unsqueeze(1) - mean_NLQ) ** 2).sum(dim=2)
            return -0.5 * (sq_NL / var_L + Q * torch.log(2 * math.pi * var_L))
        logits_NLC = torch.einsum("np,lpc->nlc", x_NP, self.experts)
        logits_NLC = torch.cat([logits_NLC, logits_NLC.new_zeros(*logits_NLC.shape[:2], 1)], 2)
        log_p_NLC = torch.log_softmax(logits_NLC, dim=2)
        index = y.long().view(-1, 1, 1).expand(-1, self.n_leaves, 1)
        return log_p_NLC.gather(2, index).squeeze(2)

    def log_likelihood(self, x_NP: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_n log P(y_n | x_n)`` (differentiable)."""
        log_prior = torch.log(self.leaf_probabilities(x_NP).clamp(min=1e-300))
        return torch.logsumexp(log_prior + self.leaf_log_likelihood(x_NP, y), dim=1).sum()

    def objective(self, x_NP: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What EM maximises: the log-likelihood minus the ridge penalty of the IRLS fits."""
        penalty = sum((W**2).sum() for W in self.gates)
        if self.kind is ExpertKind.SOFTMAX:
            penalty = penalty + (self.experts**2).sum()
        return self.log_likelihood(x_NP, y) - 0.5 * self.ridge * penalty

    def predict(self, x_NP: torch.Tensor) -> torch.Tensor:
        """Gaussian: ``(N, Q)`` the mixture mean; softmax: ``(N, C)`` class probabilities."""
        g_NL = self.leaf_probabilities(x_NP)
        if self.kind is ExpertKind.GAUSSIAN:
            return torch.einsum("nl,np,lpq->nq", g_NL, x_NP, self.experts)
        logits = torch.einsum("np,lpc->nlc", x_NP, self.experts)
        probs = torch.softmax(torch.cat([logits, logits.new_zeros(*logits.shape[:2], 1)], 2), 2)
        return torch.einsum("nl,nlc->nc", g_NL, probs)

    # ---- EM ----------------------------------------------------------------------------------

    def posteriors(self, x_NP: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E-step: ``(N, L)`` each sample's posterior over leaves (rows sum to 1)."""
        log_prior = torch.log(self.leaf_probabilities(x_NP).clamp(min=1e-300))
        return torch.softmax(log_prior + self.leaf_log_likelihood(x_NP, y), dim=1)

    @torch.no_grad()
    def em_step(self, x_NP: torch.Tensor, y: torch.Tensor) -> None:
        """One E-step and one M-step (every gate and expert refit)."""
        h_NL = self.posteriors(x_NP, y)
        B = self.branching
        for level, W_JPB1 in enumerate(self.gates):
            nodes = B**level
            child_NJB = h_NL.view(-1, nodes, B, self.n_leaves // (nodes * B)).sum(dim=3)
            node_NJ = child_NJB.sum(dim=2)
            targets_NJB = child_NJB / node_NJ.unsqueeze(2).clamp(min=1e-300)
            for j in range(nodes):
                if float(node_NJ[:, j].sum()) > 1e-9:  # an unreached gate keeps its fit
                    W_JPB1[j] = weighted_softmax_irls(
                        x_NP, targets_NJB[:, j], node_NJ[:, j], W_JPB1[j], self.ridge
                    )
        for leaf in range(self.n_leaves):
            w_N = h_NL[:, leaf]
            if float(w_N.sum()) <= 1e-9:
                continue
            if self.kind is ExpertKind.GAUSSIAN:
                W_PQ, variance = weighted_least_squares(x_NP, y, w_N)
                self.experts[leaf], self.log_variance[leaf] = W_PQ, variance.log()
            else:
                one_hot = torch.nn.functional.one_hot(y.long(), self.experts.shape[2] + 1)
                self.experts[leaf] = weighted_softmax_irls(
                    x_NP, one_hot.to(x_NP.dtype), w_N, self.experts[leaf], self.ridge
                )

    def fit_em(
        self, x_NP: torch.Tensor, y: torch.Tensor, iterations: int = 50, tol: float = 1e-7
    ) -> EMHistory:
        """EM until the objective gains less than ``tol`` (relative) or ``iterations`` run out."""
        history = EMHistory([], [])
        with torch.no_grad():
            history.objective.append(float(self.objective(x_NP, y)))
            history.log_likelihood.append(float(self.log_likelihood(x_NP, y)))
        for _ in range(iterations):
            self.em_step(x_NP, y)
            with torch.no_grad():
                history.objective.append(float(self.objective(x_NP, y)))
                history.log_likelihood.append(float(self.log_likelihood(x_NP, y)))
            gain = history.objective[-1] - history.objective[-2]
            if abs(gain) <= tol * abs(history.objective[-2]):
                break
        return history


__all__ = ["HME", "EMHistory", "ExpertKind", "with_bias"]
