"""Routers: scores -> which experts, with which weights (one module per family)."""

from moekit.routing.config import (
    ROUTER_CONFIGS,
    BaseRouterConfig,
    DenseRouterConfig,
    ExpertChoiceRouterConfig,
    Gating,
    GroupScore,
    GShardRouterConfig,
    HashRouterConfig,
    RandomStaticRouterConfig,
    RouterConfig,
    RouterKind,
    RouterOptions,
    SoftRouterConfig,
    TopKRouterConfig,
    TopPRouterConfig,
)
from moekit.routing.registry import ROUTERS, is_causal
from moekit.routing.result import Router, RoutingResult
from moekit.routing.soft import SoftRoutingResult
from moekit.routing.topk import TopKRouter

__all__ = [
    "ROUTERS",
    "ROUTER_CONFIGS",
    "BaseRouterConfig",
    "DenseRouterConfig",
    "ExpertChoiceRouterConfig",
    "GShardRouterConfig",
    "Gating",
    "GroupScore",
    "HashRouterConfig",
    "RandomStaticRouterConfig",
    "Router",
    "RouterConfig",
    "RouterKind",
    "RouterOptions",
    "RoutingResult",
    "SoftRouterConfig",
    "SoftRoutingResult",
    "TopKRouter",
    "TopKRouterConfig",
    "TopPRouterConfig",
    "is_causal",
]
