"""Moved to :mod:`moekit.models.common.placement` (the parts every model builds
from); this name still imports."""

from moekit.models.common.placement import (  # noqa: F401
    MoEPlacementConfig,
    drop_layer_d_model,
)
