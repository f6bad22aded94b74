"""Routers: scores -> which experts, with which weights (one module per family)."""

from moekit.routing.bias_balancing import update_expert_bias
from moekit.routing.config import Gating, GroupScore, RouterConfig, RouterKind
from moekit.routing.registry import ROUTERS, is_causal
from moekit.routing.result import RoutingResult
from moekit.routing.soft import SoftRoutingResult
from moekit.routing.topk import TopKRouter

__all__ = [
    "ROUTERS",
    "Gating",
    "GroupScore",
    "RouterConfig",
    "RouterKind",
    "RoutingResult",
    "SoftRoutingResult",
    "TopKRouter",
    "is_causal",
    "update_expert_bias",
]
