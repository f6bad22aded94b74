"""Expert capacity: how many assignments an expert may take."""

from __future__ import annotations

import math

#: the largest capacity reported: any factor beyond it means dropless (no int64 overflow)
CAPACITY_LIMIT = 2**62


def capacity_formula(factor: float, assignments: int, num_experts: int) -> int:
    """The dispatch capacity ``ceil(factor * assignments / E)`` exactly as documented, also when
    it exceeds ``assignments`` (which tokens drop is the same then: none); bounded by
    ``CAPACITY_LIMIT`` so a huge finite factor (1e308) means dropless, not an overflow."""
    raw = factor * assignments / num_experts
    return math.ceil(raw) if raw < CAPACITY_LIMIT else CAPACITY_LIMIT


def capacity_for(factor: float, assignments: int, num_experts: int) -> int:
    """``ceil(factor * assignments / E)``, at most ``assignments`` (an expert can never take
    more): a huge finite factor (1e20, 1e308) means dropless, not an overflow."""
    raw = factor * assignments / num_experts
    return assignments if not raw < assignments else math.ceil(raw)
