"""Moved to :mod:`moekit.models.common.attention_base` (the parts every model builds
from); this name still imports."""

from moekit.models.common.attention_base import (  # noqa: F401
    SOFTMAX_KIND,
    AttentionMixerConfig,
    upgrade_attention_dict,
)
