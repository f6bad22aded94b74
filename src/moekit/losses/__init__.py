"""Load-balancing and router losses, one function each, with the paper in the docstring."""

from moekit.losses.config import AuxLossConfig, BalanceScope
from moekit.losses.shazeer import cv_squared, importance_loss, load_loss
from moekit.losses.switch import switch_load_balancing_loss
from moekit.losses.z_loss import router_z_loss

__all__ = [
    "AuxLossConfig",
    "BalanceScope",
    "cv_squared",
    "importance_loss",
    "load_loss",
    "router_z_loss",
    "switch_load_balancing_loss",
]
