"""Routers: scores -> which experts, with which weights."""

from moekit.routing.bias_balancing import update_expert_bias
from moekit.routing.result import RoutingResult
from moekit.routing.topk import Gating, GroupScore, RouterConfig, TopKRouter

__all__ = [
    "Gating",
    "GroupScore",
    "RouterConfig",
    "RoutingResult",
    "TopKRouter",
    "update_expert_bias",
]
