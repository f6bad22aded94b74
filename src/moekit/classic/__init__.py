"""Classic mixtures of experts: Jacobs et al. 1991 and hierarchical MoE trained by EM (Jordan &
Jacobs 1994), as torch modules and scikit-learn estimators."""

from moekit.classic.hme import HME, EMHistory, ExpertKind

__all__ = ["HME", "EMHistory", "ExpertKind"]
