"""Moved to :mod:`moekit.models.common.moa` (the parts every model builds
from); this name still imports."""

from moekit.models.common.moa import (  # noqa: F401
    MixtureOfAttentionHeads,
    MoAConfig,
)
