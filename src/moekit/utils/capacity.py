"""Expert capacity: how many assignments an expert may take."""

from __future__ import annotations

import math


def capacity_for(factor: float, assignments: int, num_experts: int) -> int:
    """``ceil(factor * assignments / E)``, at most ``assignments`` (an expert can never take
    more): a huge finite factor (1e20, 1e308) means dropless, not an overflow."""
    raw = factor * assignments / num_experts
    return assignments if not raw < assignments else math.ceil(raw)
