"""The scikit-learn estimators: sklearn's checks, the defining behaviour, bad input."""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit.classic.estimators import (
    HMEClassifier,
    HMERegressor,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
)

# Small budgets: sklearn's checks fit each estimator dozens of times. Checks sklearn skips
# here: pandas inputs (pandas is not installed) and the array API (SCIPY_ARRAY_API unset).
ESTIMATORS = [
    MixtureOfExpertsRegressor(max_epochs=50, random_state=0),
    MixtureOfExpertsClassifier(max_epochs=50, random_state=0),
    HMERegressor(max_iter=10, random_state=0),
    HMEClassifier(max_iter=5, random_state=0),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_checks(estimator, check):
    check(estimator)


def _piecewise(n=300, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(-2, 2, size=(n, 1))
    y = np.where(x[:, 0] < 0, 2 * x[:, 0], -3 * x[:, 0] + 1) + 0.05 * rng.randn(n)
    return x, y


@pytest.mark.parametrize(
    "estimator",
    [
        MixtureOfExpertsRegressor(n_experts=2, max_epochs=400, random_state=0),
        HMERegressor(depth=1, branching=2, random_state=0),
    ],
)
def test_regressors_fit_a_piecewise_linear_function_with_one_expert_per_piece(estimator):
    x, y = _piecewise()
    estimator.fit(x, y)
    assert estimator.score(x, y) > 0.99
    gates = estimator.predict_gates(np.array([[-1.5], [1.5]]))
    assert gates.shape == (2, 2) and np.allclose(gates.sum(1), 1)
    assert gates[0].argmax() != gates[1].argmax()  # each expert owns one side


def test_competitive_error_specialises_more_than_cooperative():
    """Jacobs et al.'s point: the competitive error gives each sample mostly to one expert."""
    x, y = _piecewise()
    sharp = {}
    for error in ("cooperative", "competitive"):
        model = MixtureOfExpertsRegressor(n_experts=2, error=error, max_epochs=400, random_state=0)
        sharp[error] = model.fit(x, y).predict_gates(x).max(1).mean()
    assert sharp["competitive"] > sharp["cooperative"]


@pytest.mark.parametrize("cls", [MixtureOfExpertsClassifier, HMEClassifier])
def test_classifiers_on_wine(cls):
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    model = cls(random_state=0).fit(X, y)
    assert model.score(X, y) > 0.95
    proba = model.predict_proba(X)
    assert np.allclose(proba.sum(1), 1) and list(model.classes_) == [0, 1, 2]


@pytest.mark.parametrize("cls", [MixtureOfExpertsRegressor, HMERegressor])
def test_bad_input_gets_a_clear_error(cls):
    x, y = _piecewise(20)
    x_nan = x.copy()
    x_nan[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cls().fit(x_nan, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        cls().fit(x, y[:-1])
    with pytest.raises(ValueError, match=r"n_experts must be an integer >= 1|depth must be"):
        (cls(n_experts=0) if cls is MixtureOfExpertsRegressor else cls(depth=0)).fit(x, y)


def test_one_class_only_is_refused():
    x, _ = _piecewise(20)
    with pytest.raises(ValueError, match="class"):
        HMEClassifier().fit(x, np.zeros(20))


def test_estimators_import_from_the_package_and_name_the_extra_without_sklearn():
    import subprocess
    import sys

    from moekit.classic import HMEClassifier, HMERegressor  # noqa: F401

    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import moekit, moekit.training, moekit.classic\n"
        "try:\n"
        "    from moekit.classic import HMERegressor\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'moekit[classic]'" in out.stdout, out.stderr
