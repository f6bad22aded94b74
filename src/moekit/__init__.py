"""moekit: Mixture-of-Experts layers, routers, losses and tools on PyTorch."""

from moekit.dispatch.config import CapacityScope, DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertBank, ExpertConfig, ModuleExperts
from moekit.experts.dense import FeedForward
from moekit.experts.shared import SharedExpertConfig, SharedExperts
from moekit.layers import (
    MoE,
    MoEConfig,
    MoEOutput,
    RoutingStats,
    collect_moe_outputs,
    record_routing,
    replay_routing,
    serving,
    set_compute_budget,
    set_statistics,
    set_top_k,
    update_expert_bias,
    update_expert_thresholds,
    update_null_offsets,
    without_statistics,
)
from moekit.losses.config import AuxLossConfig, BalanceScope
from moekit.routing import (
    BaseRouterConfig,
    CausalSoftRouterConfig,
    DenseRouterConfig,
    ExpertChoiceRouterConfig,
    ExpertThresholdRouterConfig,
    Gating,
    GroupScore,
    GShardRouterConfig,
    HashRouterConfig,
    RandomStaticRouterConfig,
    RouterConfig,
    RouterKind,
    SoftRouterConfig,
    SparseMixerRouterConfig,
    TokenTableRouterConfig,
    TopKRouterConfig,
    TopPRouterConfig,
)
from moekit.routing.engine_routes import (
    TokenRoutes,
    batch_routes,
    routes_from_sglang,
    routes_from_vllm,
)
from moekit.routing.result import RoutingResult
from moekit.routing.topk import TopKRouter
from moekit.routing.trace import RoutingTrace

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "AuxLossConfig",
    "BalanceScope",
    "BaseRouterConfig",
    "CapacityScope",
    "CausalSoftRouterConfig",
    "DenseRouterConfig",
    "DispatchConfig",
    "DispatchMode",
    "DropPriority",
    "ExpertBank",
    "ExpertChoiceRouterConfig",
    "ExpertConfig",
    "ExpertThresholdRouterConfig",
    "FeedForward",
    "GShardRouterConfig",
    "Gating",
    "GroupScore",
    "HashRouterConfig",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "ModuleExperts",
    "RandomStaticRouterConfig",
    "RouterConfig",
    "RouterKind",
    "RoutingResult",
    "RoutingStats",
    "RoutingTrace",
    "SharedExpertConfig",
    "SharedExperts",
    "SoftRouterConfig",
    "SparseMixerRouterConfig",
    "TokenRoutes",
    "TokenTableRouterConfig",
    "TopKRouter",
    "TopKRouterConfig",
    "TopPRouterConfig",
    "batch_routes",
    "collect_moe_outputs",
    "record_routing",
    "replay_routing",
    "routes_from_sglang",
    "routes_from_vllm",
    "serving",
    "set_compute_budget",
    "set_statistics",
    "set_top_k",
    "update_expert_bias",
    "update_expert_thresholds",
    "update_null_offsets",
    "without_statistics",
]
