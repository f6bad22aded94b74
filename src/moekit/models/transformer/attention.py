"""Moved to :mod:`moekit.models.common.attention` (the parts every model builds
from); this name still imports."""

from moekit.models.common.attention import (  # noqa: F401
    Attention,
    AttentionConfig,
    KVCache,
    QKNorm,
    QueryTemperatureConfig,
    ValueSource,
)
