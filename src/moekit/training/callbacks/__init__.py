"""The training loop's hooks, one file each: every one runs after each optimizer step (in this
order by default) and at the end of training."""

from moekit.training.callbacks.base import Callback
from moekit.training.callbacks.checkpointing import Checkpointing
from moekit.training.callbacks.evaluation import Evaluation
from moekit.training.callbacks.metrics import Metrics
from moekit.training.callbacks.progress import Progress
from moekit.training.callbacks.router_state import BiasUpdate, RouterStateUpdate
from moekit.training.callbacks.routing_health import RoutingHealth, worst_load

__all__ = [
    "BiasUpdate",
    "Callback",
    "Checkpointing",
    "Evaluation",
    "Metrics",
    "Progress",
    "RouterStateUpdate",
    "RoutingHealth",
    "worst_load",
]
