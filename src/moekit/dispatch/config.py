"""Dispatch options: dropless, or capacity-limited with token dropping (GShard, Switch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from moekit.utils.capacity import capacity_for
from moekit.utils.validation import check_fields


class DispatchMode(str, Enum):
    """Dropless (every assignment computed) or capacity (at most C per expert, rest dropped)."""

    DROPLESS = "dropless"  # every assignment computed (MegaBlocks-style, sort + grouped GEMM)
    CAPACITY = "capacity"  # each expert takes at most C assignments; the rest are dropped


class DropPriority(str, Enum):
    """Which assignments an over-full expert keeps.

    ``probability``: the highest combine weights first (batch-prioritised routing, Riquelme et
    al. 2021). ``position``: every token's first choice before any second choice, and within a
    choice rank earlier tokens first (GShard / Switch Transformer). ``token``: position by
    position across the batch (every sequence's position 0, then every position 1, ...), a
    token's choices in order; the only order in which whether a token is kept never depends on
    later positions, so it is the one a causal model may use.
    """

    PROBABILITY = "probability"
    POSITION = "position"
    TOKEN = "token"


@dataclass(kw_only=True)
class DispatchConfig:
    """How tokens reach experts.

    Args:
        mode: ``dropless`` or ``capacity``.
        capacity_factor: training capacity factor ``c`` in ``C = ceil(c * T * K / E)``.
        eval_capacity_factor: the same in eval mode.
        min_capacity: lower bound on ``C``.
        drop_priority: ``probability`` or ``position``.
    """

    mode: DispatchMode = DispatchMode.DROPLESS
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_priority: DropPriority = DropPriority.PROBABILITY

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")

    def capacity(self, num_tokens: int, top_k: int, num_experts: int, training: bool) -> int | None:
        """``C = max(min_capacity, ceil(factor * T * K / E))``, or ``None`` when dropless."""
        if self.mode is DispatchMode.DROPLESS:
            return None
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return max(self.min_capacity, capacity_for(factor, num_tokens * top_k, num_experts))
