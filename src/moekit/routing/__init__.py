"""Routers: scores -> which experts, with which weights (one module per family, each with its
config beside it; ``config.py`` holds what they share)."""

from moekit.routing.base_layers import BalancedAssignmentRouter, BaseRouterConfig
from moekit.routing.causal_soft import CausalSoftMoERouter, CausalSoftRouterConfig
from moekit.routing.config import (
    ROUTER_CONFIGS,
    GatedRouter,
    GateOptions,
    RouterBase,
    RouterConfig,
    RouterKind,
    RouterOptions,
    is_causal,
)
from moekit.routing.dense import DenseGateRouter, DenseRouterConfig
from moekit.routing.expert_choice import ExpertChoiceRouter, ExpertChoiceRouterConfig
from moekit.routing.expert_threshold import ExpertThresholdRouter, ExpertThresholdRouterConfig
from moekit.routing.gshard import GShardRouterConfig, GShardTop2Router, SecondExpertPolicy
from moekit.routing.hashing import (
    HashRouter,
    HashRouterConfig,
    RandomStaticRouterConfig,
    TokenTableRouter,
    TokenTableRouterConfig,
)
from moekit.routing.result import Router, RoutingResult
from moekit.routing.soft import SoftMoERouter, SoftRouterConfig, SoftRoutingResult
from moekit.routing.sparsemixer import SparseMixerRouter, SparseMixerRouterConfig
from moekit.routing.top_p import TopPRouter, TopPRouterConfig
from moekit.routing.topk import Gating, GroupScore, TopKRouter, TopKRouterConfig

__all__ = [
    "ROUTER_CONFIGS",
    "BalancedAssignmentRouter",
    "BaseRouterConfig",
    "CausalSoftMoERouter",
    "CausalSoftRouterConfig",
    "DenseGateRouter",
    "DenseRouterConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "ExpertThresholdRouter",
    "ExpertThresholdRouterConfig",
    "GShardRouterConfig",
    "GShardTop2Router",
    "GateOptions",
    "GatedRouter",
    "Gating",
    "GroupScore",
    "HashRouter",
    "HashRouterConfig",
    "RandomStaticRouterConfig",
    "Router",
    "RouterBase",
    "RouterConfig",
    "RouterKind",
    "RouterOptions",
    "RoutingResult",
    "SecondExpertPolicy",
    "SoftMoERouter",
    "SoftRouterConfig",
    "SoftRoutingResult",
    "SparseMixerRouter",
    "SparseMixerRouterConfig",
    "TokenTableRouter",
    "TokenTableRouterConfig",
    "TopKRouter",
    "TopKRouterConfig",
    "TopPRouter",
    "TopPRouterConfig",
    "is_causal",
]
