"""Expert banks: stacked-weight experts computed by grouped matmul, and any-module experts."""

from moekit.experts.activations import Activation, apply_activation
from moekit.experts.bank import ExpertBank, ExpertConfig, ModuleExperts
from moekit.experts.dense import FeedForward
from moekit.experts.grouped_matmul import GroupedMatmulKernel

__all__ = [
    "Activation",
    "ExpertBank",
    "ExpertConfig",
    "FeedForward",
    "GroupedMatmulKernel",
    "ModuleExperts",
    "apply_activation",
]
