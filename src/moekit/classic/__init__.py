"""Classic mixtures of experts: Jacobs et al. 1991 and hierarchical MoE trained by EM (Jordan &
Jacobs 1994), as torch modules and scikit-learn estimators.

The estimators (``HMERegressor``, ``HMEClassifier``, ``MixtureOfExpertsRegressor``,
``MixtureOfExpertsClassifier``) need scikit-learn (``pip install 'moekit[classic]'``); it is
imported when one of them is first used, so the rest of moekit never pays for it.
"""

from __future__ import annotations

from typing import Any

from moekit.classic.hme import HME, EMHistory, ExpertKind
from moekit.classic.methods import TrainingMethod, fit_mixture
from moekit.classic.mixture import MixtureOfLocalExperts

_ESTIMATORS = (
    "HMEClassifier",
    "HMERegressor",
    "MixtureOfExpertsClassifier",
    "MixtureOfExpertsRegressor",
)

__all__ = [
    "HME",
    "EMHistory",
    "ExpertKind",
    "MixtureOfLocalExperts",
    "TrainingMethod",
    "fit_mixture",
    *_ESTIMATORS,
]


def __getattr__(name: str) -> Any:
    """The scikit-learn estimators, imported on first use."""
    if name not in _ESTIMATORS:
        raise AttributeError(f"module 'moekit.classic' has no attribute {name!r}")
    try:
        from moekit.classic import estimators  # noqa: PLC0415 (needs scikit-learn, on first use)
    except ImportError as error:
        if error.name is None or not error.name.startswith("sklearn"):
            raise
        raise ImportError(
            f"moekit.classic.{name} needs scikit-learn: pip install 'moekit[classic]'"
        ) from error
    return getattr(estimators, name)
