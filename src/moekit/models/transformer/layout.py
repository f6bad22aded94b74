"""Moved to :mod:`moekit.models.common.layout` (the parts every model builds
from); this name still imports."""

from moekit.models.common.layout import (  # noqa: F401
    ATTENTION,
    FFN,
    NONE,
    AnyAttentionConfig,
    TokenMixerConfig,
    TokenMixerLayout,
)
