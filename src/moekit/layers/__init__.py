"""The MoE layer (router + dispatcher + expert bank + shared experts), its routing statistics,
and every model-wide switch (``moekit.layers.switches``)."""

from moekit.layers.moe import MoE, MoEConfig, MoEOutput, SoftMoE
from moekit.layers.statistics import RoutingStats, router_entropy, routing_stats
from moekit.layers.switches import (
    MoEOutputCollector,
    collect_moe_outputs,
    global_batch_balance,
    moe_layers,
    moe_routers,
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

__all__ = [
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEOutputCollector",
    "RoutingStats",
    "SoftMoE",
    "collect_moe_outputs",
    "global_batch_balance",
    "moe_layers",
    "moe_routers",
    "record_routing",
    "replay_routing",
    "router_entropy",
    "routing_stats",
    "serving",
    "set_compute_budget",
    "set_statistics",
    "set_top_k",
    "update_expert_bias",
    "update_expert_thresholds",
    "update_null_offsets",
    "without_statistics",
]
