"""Moving tokens to experts and back: local sort-and-group, with or without capacity."""

from moekit.dispatch.config import CapacityScope, DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig, Dispatcher
from moekit.dispatch.sort import DispatchPlan, plan_dispatch

__all__ = [
    "CapacityScope",
    "DispatchConfig",
    "DispatchMode",
    "DispatchPlan",
    "Dispatcher",
    "DropPriority",
    "plan_dispatch",
]
