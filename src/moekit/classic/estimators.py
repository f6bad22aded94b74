"""scikit-learn estimators for the classic mixtures of experts (needs ``moekit[classic]``).

* ``MixtureOfExpertsRegressor`` / ``MixtureOfExpertsClassifier``: Jacobs et al. 1991, K linear
  or one-hidden-layer experts and a softmax gate, trained by gradient (full-batch Adam) on the
  cooperative or the competitive error.
* ``HMERegressor`` / ``HMEClassifier``: Jordan & Jacobs 1994, a tree of gates over generalised
  linear experts, trained by EM (or by gradient on the log-likelihood, for comparison).

All standardise X (and a regressor's y) internally, take ``random_state``, and expose
``predict_gates(X)``: the ``(n_samples, n_experts)`` gate probabilities, which expert owns which
region of the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit.classic.glm import with_bias
from moekit.classic.hme import HME, ExpertKind
from moekit.classic.methods import fit_mixture
from moekit.classic.mixture import MixtureOfLocalExperts


def _generator(random_state: Any) -> torch.Generator:
    seed = (
        np.random.RandomState(random_state).randint(0, 2**31 - 1)
        if not isinstance(random_state, np.random.RandomState)
        else random_state.randint(0, 2**31 - 1)
    )
    return torch.Generator().manual_seed(int(seed))


class _ClassicMixin:
    """Input checks, standardisation and the fitted torch model, shared by the estimators."""

    _classification = False

    def _check_common(self) -> None:
        n = getattr(self, "n_experts", None)
        if n is not None and (not isinstance(n, int | np.integer) or n < 1):
            raise ValueError(f"n_experts must be an integer >= 1, got {n!r}")
        for name in ("depth", "branching"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, int | np.integer) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def _prepare_fit(self, X, y) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_common()
        X, y = validate_data(self, X, y, y_numeric=not self._classification, dtype=np.float64)
        self.x_mean_ = X.mean(axis=0)
        self.x_scale_ = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
        if self._classification:
            check_classification_targets(y)
            self._encoder = LabelEncoder().fit(y)
            self.classes_ = self._encoder.classes_
            if len(self.classes_) < 2:
                raise ValueError(
                    f"the target has one class only ({self.classes_[0]!r}); a classifier needs "
                    ">= 2 classes"
                )
            target = torch.as_tensor(self._encoder.transform(y))
        else:
            y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
            self._y_1d = np.asarray(y).ndim == 1
            self.y_mean_ = y2.mean(axis=0)
            self.y_scale_ = np.where(y2.std(axis=0) > 0, y2.std(axis=0), 1.0)
            target = torch.as_tensor((y2 - self.y_mean_) / self.y_scale_)
        return self._inputs(X, check=False), target

    def _inputs(self, X, check: bool = True) -> torch.Tensor:
        if check:
            check_is_fitted(self)
            X = validate_data(self, X, reset=False, dtype=np.float64)
        return torch.as_tensor((X - self.x_mean_) / self.x_scale_)

    def _regression_output(self, out_NQ: torch.Tensor) -> np.ndarray:
        y = out_NQ.detach().numpy() * self.y_scale_ + self.y_mean_
        return y[:, 0] if self._y_1d else y

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.non_deterministic = False
        return tags


class _MixtureOfExperts(_ClassicMixin, BaseEstimator):
    def __init__(
        self,
        n_experts: int = 4,
        *,
        expert_hidden: int = 0,
        gate_hidden: int = 0,
        error: str = "competitive",
        training: str = "joint",
        learn_variance: bool = True,
        max_epochs: int = 300,
        learning_rate: float = 0.02,
        tol: float = 1e-6,
        random_state: Any = None,
    ) -> None:
        self.n_experts = n_experts
        self.expert_hidden = expert_hidden
        self.gate_hidden = gate_hidden
        self.error = error
        self.training = training
        self.learn_variance = learn_variance
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.tol = tol
        self.random_state = random_state

    def fit(self, X, y):
        """Train by ``training`` (``joint``, ``gradient``, ``separate``, ``alternating`` or
        ``evolutionary``; ``moekit.classic.methods``) on the chosen error, full batch;
        ``loss_curve_`` holds the error after each epoch (each generation for evolutionary)."""
        x_NI, target = self._prepare_fit(X, y)
        n_out = len(self.classes_) if self._classification else target.shape[1]
        torch.manual_seed(int(_generator(self.random_state).initial_seed()))
        model = MixtureOfLocalExperts(
            x_NI.shape[1],
            n_out,
            self.n_experts,
            classification=self._classification,
            expert_hidden=self.expert_hidden,
            gate_hidden=self.gate_hidden,
            learn_variance=self.learn_variance,
        ).double()
        self.loss_curve_ = fit_mixture(
            model,
            x_NI,
            target,
            method=self.training,
            error=self.error,
            epochs=self.max_epochs,
            learning_rate=self.learning_rate,
            seed=int(_generator(self.random_state).initial_seed()) % (2**31),
            tol=self.tol,
        )
        self.n_iter_ = len(self.loss_curve_)
        self.model_ = model
        return self

    def predict_gates(self, X) -> np.ndarray:
        """``(n_samples, n_experts)`` gate probabilities."""
        x_NI = self._inputs(X)  # checks that the estimator is fitted first
        with torch.no_grad():
            return self.model_(x_NI)[0].numpy()


class MixtureOfExpertsRegressor(RegressorMixin, _MixtureOfExperts):
    """Jacobs et al. 1991 mixture of local experts for regression (see the module docstring)."""

    def predict(self, X) -> np.ndarray:
        """Predicted targets for ``X`` ``(n_samples, n_features)``."""
        x_NI = self._inputs(X)
        with torch.no_grad():
            return self._regression_output(self.model_.predict(x_NI))


class MixtureOfExpertsClassifier(ClassifierMixin, _MixtureOfExperts):
    """Jacobs et al. 1991 mixture of local experts with softmax experts."""

    _classification = True

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` for ``X``."""
        x_NI = self._inputs(X)
        with torch.no_grad():
            return self.model_.predict(x_NI).numpy()

    def predict(self, X) -> np.ndarray:
        """Predicted class labels for ``X`` ``(n_samples, n_features)``."""
        proba = self.predict_proba(X)  # checks that the estimator is fitted first
        return self.classes_[proba.argmax(axis=1)]


class _HME(_ClassicMixin, BaseEstimator):
    def __init__(
        self,
        depth: int = 2,
        branching: int = 2,
        *,
        training: str = "em",
        max_iter: int = 100,
        tol: float = 1e-6,
        ridge: float = 1e-4,
        learning_rate: float = 0.02,
        random_state: Any = None,
    ) -> None:
        self.depth = depth
        self.branching = branching
        self.training = training
        self.max_iter = max_iter
        self.tol = tol
        self.ridge = ridge
        self.learning_rate = learning_rate
        self.random_state = random_state

    def fit(self, X, y):
        """EM (``training='em'``; ``log_likelihood_`` per iteration) or full-batch Adam on the
        log-likelihood (``training='gradient'``)."""
        x_NI, target = self._prepare_fit(X, y)
        if self.training not in ("em", "gradient"):
            raise ValueError(f"training must be 'em' or 'gradient', got {self.training!r}")
        n_out = len(self.classes_) if self._classification else target.shape[1]
        model = HME(
            x_NI.shape[1],
            n_out,
            kind=ExpertKind.SOFTMAX if self._classification else ExpertKind.GAUSSIAN,
            depth=self.depth,
            branching=self.branching,
            ridge=self.ridge,
            generator=_generator(self.random_state),
        )
        x_NP = with_bias(x_NI)
        if self.training == "em":
            history = model.fit_em(x_NP, target, iterations=self.max_iter, tol=self.tol)
            self.log_likelihood_ = history.log_likelihood
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
            self.log_likelihood_ = []
            for _ in range(self.max_iter):
                optimizer.zero_grad()
                loss = -model.objective(x_NP, target) / len(x_NP)
                loss.backward()
                optimizer.step()
                self.log_likelihood_.append(-float(loss) * len(x_NP))
        self.n_iter_ = len(self.log_likelihood_) - (self.training == "em")
        self.model_ = model
        return self

    def predict_gates(self, X) -> np.ndarray:
        """``(n_samples, branching**depth)`` prior probability of each expert (leaf)."""
        x_NP = with_bias(self._inputs(X))
        with torch.no_grad():
            return self.model_.leaf_probabilities(x_NP).numpy()


class HMERegressor(RegressorMixin, _HME):
    """Hierarchical mixture of Gaussian linear experts (Jordan & Jacobs 1994)."""

    def predict(self, X) -> np.ndarray:
        """Predicted targets for ``X`` ``(n_samples, n_features)``."""
        x_NP = with_bias(self._inputs(X))
        with torch.no_grad():
            return self._regression_output(self.model_.predict(x_NP))


class HMEClassifier(ClassifierMixin, _HME):
    """Hierarchical mixture of softmax (multinomial logistic) experts (Jordan & Jacobs 1994)."""

    _classification = True

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` for ``X``."""
        x_NP = with_bias(self._inputs(X))
        with torch.no_grad():
            return self.model_.predict(x_NP).numpy()

    def predict(self, X) -> np.ndarray:
        """Predicted class labels for ``X`` ``(n_samples, n_features)``."""
        proba = self.predict_proba(X)  # checks that the estimator is fitted first
        return self.classes_[proba.argmax(axis=1)]
