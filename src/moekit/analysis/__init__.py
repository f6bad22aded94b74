"""Parameter/FLOP accounting, routing statistics, plots."""

from moekit.analysis.routing_stats import RoutingStats, router_entropy

__all__ = ["RoutingStats", "router_entropy"]
