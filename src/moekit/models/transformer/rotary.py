"""Moved to :mod:`moekit.models.common.rotary` (the parts every model builds
from); this name still imports."""

from moekit.models.common.rotary import (  # noqa: F401
    RopeScalingConfig,
    RotaryConfig,
    apply_rotary,
    rotary_tables,
    yarn_mscale,
)
