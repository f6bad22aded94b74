"""Moved to :mod:`moekit.models.common.t5_attention` (the parts every model builds
from); this name still imports."""

from moekit.models.common.t5_attention import (  # noqa: F401
    T5Attention,
    T5AttentionConfig,
    additive_mask,
)
