"""Weighted generalised linear fits: the M-step pieces of EM for mixtures of experts.

Legend: N = samples, P = inputs (plus one bias column), Q = regression outputs, C = classes.

``weighted_least_squares`` fits a Gaussian expert exactly; ``weighted_softmax_irls`` fits a
multinomial logistic model (a softmax expert, or a gating network whose targets are the EM
posteriors) by iteratively reweighted least squares (Newton's method), with step halving so the
weighted log-likelihood never goes down. The last class is the reference (its logits are 0),
which makes the Hessian invertible; a small ridge keeps it so on separable data.
"""

from __future__ import annotations

import torch


def with_bias(x_NP: torch.Tensor) -> torch.Tensor:
    """``[x | 1]``: inputs with a constant column for the intercept."""
    return torch.cat([x_NP, x_NP.new_ones(x_NP.shape[0], 1)], dim=1)


def weighted_least_squares(
    x_NP: torch.Tensor, y_NQ: torch.Tensor, w_N: torch.Tensor, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_PQ, variance)`` maximising ``sum_n w_n log N(y_n | x_n W, variance I)``.

    ``ridge`` adds ``ridge * ||W||^2 / 2`` (intercept included) to the objective's minimiser;
    the variance is floored at 1e-8 so a perfectly fit expert does not blow up the likelihood.
    """
    P, Q = x_NP.shape[1], y_NQ.shape[1]
    xw = x_NP * w_N.unsqueeze(1)
    gram = x_NP.t() @ xw + ridge * torch.eye(P, dtype=x_NP.dtype, device=x_NP.device)
    W_PQ = torch.linalg.lstsq(gram, xw.t() @ y_NQ).solution
    residual = ((y_NQ - x_NP @ W_PQ) ** 2).sum(dim=1)
    variance = (w_N * residual).sum() / (Q * w_N.sum().clamp(min=1e-12))
    return W_PQ, variance.clamp(min=1e-8)


def softmax_with_reference(x_NP: torch.Tensor, W_PC1: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` probabilities of a multinomial model whose last class has logits 0."""
    logits = torch.cat([x_NP @ W_PC1, x_NP.new_zeros(x_NP.shape[0], 1)], dim=1)
    return torch.softmax(logits, dim=1)


def weighted_softmax_log_likelihood(
    x_NP: torch.Tensor, t_NC: torch.Tensor, w_N: torch.Tensor, W_PC1: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``sum_n w_n sum_c t_nc log p_nc - ridge * ||W||^2 / 2`` (soft targets allowed)."""
    logits = torch.cat([x_NP @ W_PC1, x_NP.new_zeros(x_NP.shape[0], 1)], dim=1)
    log_p = torch.log_softmax(logits, dim=1)
    return (w_N.unsqueeze(1) * t_NC * log_p).sum() - 0.5 * ridge * (W_PC1**2).sum()


def weighted_softmax_irls(
    x_NP: torch.Tensor,
    t_NC: torch.Tensor,
    w_N: torch.Tensor,
    W_PC1: torch.Tensor,
    ridge: float = 1e-6,
    iterations: int = 5,
) -> torch.Tensor:
    """Newton (IRLS) steps on the weighted multinomial log-likelihood from ``W_PC1``.

    Args:
        x_NP: inputs with the bias column.
        t_NC: targets, rows summing to 1 (one-hot labels or EM posteriors).
        w_N: sample weights (EM: the posterior of reaching this node).
        W_PC1: current parameters ``(P, C-1)`` (the last class is the reference).
        ridge: L2 penalty keeping the Hessian invertible.
        iterations: Newton steps; each is halved until the objective does not decrease.

    Returns:
        The new ``(P, C-1)`` parameters.
    """
    P, C1 = W_PC1.shape
    eye = torch.eye(P * C1, dtype=x_NP.dtype, device=x_NP.device)
    current = weighted_softmax_log_likelihood(x_NP, t_NC, w_N, W_PC1, ridge)
    for _ in range(iterations):
        p_NC1 = softmax_with_reference(x_NP, W_PC1)[:, :C1]
        grad_PC1 = x_NP.t() @ (w_N.unsqueeze(1) * (t_NC[:, :C1] - p_NC1)) - ridge * W_PC1
        # Hessian of the negative objective: sum_n w_n (diag(p) - p p^T) kron x x^T + ridge
        cov_NCC = torch.diag_embed(p_NC1) - p_NC1.unsqueeze(2) * p_NC1.unsqueeze(1)
        hess = x_NP.new_empty(C1, P, C1, P)
        for a in range(C1):  # C-1 squared products of (P, N) (N, P): no (N, C, C, P, P) tensor
            for b in range(a, C1):
                block = (x_NP * (w_N * cov_NCC[:, a, b]).unsqueeze(1)).t() @ x_NP
                hess[a, :, b, :] = block
                hess[b, :, a, :] = block.t()
        hess = hess.reshape(C1 * P, C1 * P) + ridge * eye
        step = torch.linalg.solve(hess, grad_PC1.t().reshape(-1)).reshape(C1, P).t()
        scale = 1.0
        while scale > 1e-6:
            candidate = W_PC1 + scale * step
            value = weighted_softmax_log_likelihood(x_NP, t_NC, w_N, candidate, ridge)
            if value >= current:
                W_PC1, current = candidate, value
                break
            scale /= 2
        else:
            break  # no step improves: at the optimum (to numerical precision)
    return W_PC1
