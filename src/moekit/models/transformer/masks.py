"""Moved to :mod:`moekit.models.common.masks` (the parts every model builds
from); this name still imports."""

from moekit.models.common.masks import (  # noqa: F401
    allowed_keys,
)
