"""Which auxiliary losses an MoE layer computes, and their weights."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moekit.utils.validation import check_fields


class BalanceScope(str, Enum):
    """Over which tokens the Switch loss counts load."""

    BATCH = "batch"  # all tokens of the call (Switch, GShard)
    SEQUENCE = "sequence"  # within each sequence, averaged (DeepSeek's sequence-wise loss)


@dataclass(kw_only=True)
class AuxLossConfig:
    """Weights of the auxiliary losses; a loss with weight 0 is not computed.

    Args:
        switch: weight of the Switch loss ``E * sum f_i P_i`` (Fedus et al. 2021 use 0.01).
        switch_scope: ``batch`` or ``sequence``.
        z_loss: weight of the router z-loss (ST-MoE uses 0.001).
        importance: weight of Shazeer et al.'s importance loss (they use 0.1).
        load: weight of Shazeer et al.'s load loss (needs noisy gating; they use 0.1).
    """

    switch: float = 0.01
    switch_scope: BalanceScope = BalanceScope.BATCH
    z_loss: float = 0.0
    importance: float = 0.0
    load: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("switch", "z_loss", "importance", "load"):
            if getattr(self, name) < 0:
                raise ValueError(f"aux loss weight {name} must be >= 0, got {getattr(self, name)}")

    def weights(self) -> dict[str, float]:
        """The non-zero weights by loss name."""
        all_weights = {
            "switch": self.switch,
            "z_loss": self.z_loss,
            "importance": self.importance,
            "load": self.load,
        }
        return {name: w for name, w in all_weights.items() if w > 0}
