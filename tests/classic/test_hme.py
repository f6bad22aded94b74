"""Hierarchical mixture of experts trained by EM (Jordan & Jacobs 1994)."""

import numpy as np
import pytest
import torch

from moekit.classic import HME
from moekit.classic.glm import weighted_least_squares, weighted_softmax_irls, with_bias


def _piecewise(n: int = 400, seed: int = 0):
    """y = 2x for x < 0 and -3x + 1 for x > 0, with small noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.where(x < 0, 2 * x, -3 * x + 1)
    return x, y + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("depth, branching", [(1, 2), (2, 2), (1, 3), (3, 2)])
def test_em_never_lowers_the_objective_gaussian(depth, branching):
    x, y = _piecewise()
    model = HME(1, 1, depth=depth, branching=branching, generator=torch.Generator().manual_seed(1))
    history = model.fit_em(with_bias(x), y, iterations=40, tol=0.0)
    steps = np.diff(history.objective)
    assert (steps >= -1e-9 * np.abs(history.objective[:-1])).all(), steps.min()
    assert history.log_likelihood[-1] > history.log_likelihood[0] + 100


@pytest.mark.parametrize("depth", [1, 2])
def test_em_never_lowers_the_objective_softmax(depth):
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    X = torch.as_tensor((X - X.mean(0)) / X.std(0))
    model = HME(13, 3, kind="softmax", depth=depth, generator=torch.Generator().manual_seed(0))
    history = model.fit_em(with_bias(X), torch.as_tensor(y), iterations=15, tol=0.0)
    steps = np.diff(history.objective)
    assert (steps >= -1e-9 * np.abs(history.objective[:-1])).all(), steps.min()


def test_each_expert_recovers_one_linear_piece():
    x, y = _piecewise()
    model = HME(1, 1, depth=1, branching=2, generator=torch.Generator().manual_seed(1))
    model.fit_em(with_bias(x), y, iterations=100)
    pieces = sorted(tuple(round(v, 1) for v in w[:, 0].tolist()) for w in model.experts.detach())
    assert pieces == [(-3.0, 1.0), (2.0, 0.0)]  # (slope, intercept) of each piece
    gates = model.leaf_probabilities(with_bias(torch.tensor([[-1.5], [1.5]], dtype=torch.float64)))
    assert gates.argmax(1).tolist()[0] != gates.argmax(1).tolist()[1]  # each owns one side


def test_posteriors_and_leaf_priors_sum_to_one():
    x, y = _piecewise(50)
    model = HME(1, 1, depth=2, branching=3, generator=torch.Generator().manual_seed(0))
    X = with_bias(x)
    torch.testing.assert_close(model.leaf_probabilities(X).sum(1), torch.ones(50, dtype=X.dtype))
    torch.testing.assert_close(model.posteriors(X, y).sum(1), torch.ones(50, dtype=X.dtype))


def test_one_expert_equals_the_single_glm():
    """B = 1: the only leaf gets every sample, so EM gives plain least squares."""
    x, y = _piecewise(100)
    X = with_bias(x)
    model = HME(1, 1, depth=1, branching=1)
    model.fit_em(X, y, iterations=3)
    W, _ = weighted_least_squares(X, y, torch.ones(100, dtype=X.dtype))
    torch.testing.assert_close(model.experts[0].detach(), W)
    torch.testing.assert_close(model.predict(X), X @ W)


def test_irls_matches_a_plain_optimiser_on_the_weighted_objective():
    g = torch.Generator().manual_seed(0)
    X = with_bias(torch.randn(60, 3, generator=g, dtype=torch.float64))
    t = torch.softmax(torch.randn(60, 4, generator=g, dtype=torch.float64), 1)
    w = torch.rand(60, generator=g, dtype=torch.float64)
    W = weighted_softmax_irls(X, t, w, torch.zeros(4, 3, dtype=X.dtype), ridge=1e-3, iterations=30)
    ref = torch.zeros(4, 3, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([ref], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        logits = torch.cat([X @ ref, X.new_zeros(60, 1)], 1)
        loss = -(w[:, None] * t * torch.log_softmax(logits, 1)).sum() + 5e-4 * (ref**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(W, ref.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_training_raises_the_likelihood_too():
    x, y = _piecewise()
    X = with_bias(x)
    model = HME(1, 1, depth=1, branching=2, generator=torch.Generator().manual_seed(1))
    before = float(model.log_likelihood(X, y))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        (-model.log_likelihood(X, y) / len(X)).backward()
        opt.step()
    assert float(model.log_likelihood(X, y)) > before + 100


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="depth and branching must be >= 1"):
        HME(2, 1, depth=0)
    with pytest.raises(ValueError, match="softmax expert needs >= 2 classes"):
        HME(2, 1, kind="softmax")
