"""Moved to :mod:`moekit.models.common.mla` (the parts every model builds
from); this name still imports."""

from moekit.models.common.mla import (  # noqa: F401
    MLAConfig,
    MultiHeadLatentAttention,
    mla_softmax_scale,
)
