"""Moving tokens to experts and back: local sort-and-group, with or without capacity."""

from moekit.dispatch.config import DispatchConfig, DispatchMode, DropPriority
from moekit.dispatch.dispatcher import Dispatcher
from moekit.dispatch.sort import DispatchPlan, dispatch_and_combine, plan_dispatch

__all__ = [
    "DispatchConfig",
    "Dispatcher",
    "DispatchMode",
    "DispatchPlan",
    "DropPriority",
    "dispatch_and_combine",
    "plan_dispatch",
]
