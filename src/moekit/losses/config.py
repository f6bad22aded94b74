"""Which auxiliary losses an MoE layer computes, and their weights."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moekit.utils.validation import check_fields


class BalanceScope(str, Enum):
    """Over which tokens a balance loss counts load."""

    MICRO_BATCH = "micro_batch"  # all tokens of the call, on every data-parallel rank
    SEQUENCE = "sequence"  # within each sequence, averaged (DeepSeek's sequence-wise loss)
    # every token of the optimizer step: all gradient-accumulation micro-batches on all ranks
    # (moekit.losses.global_batch; needs the training loop's routing pre-pass)
    GLOBAL_BATCH = "global_batch"


@dataclass(kw_only=True)
class AuxLossConfig:
    """Weights of the auxiliary losses; a loss with weight 0 is not computed.

    Args:
        switch: weight of the Switch loss ``E * sum f_i P_i`` (Fedus et al. 2021 use 0.01).
        switch_scope: ``micro_batch``, ``sequence`` or ``global_batch``.
        switch_sequence: weight of an additional per-sequence Switch loss, combinable with
            ``switch`` at another scope (DeepSeek-V3 adds a tiny one to bias balancing).
        z_loss: weight of the router z-loss (ST-MoE uses 0.001).
        importance: weight of Shazeer et al.'s importance loss (they use 0.1).
        importance_scope: ``micro_batch`` or ``global_batch``.
        load: weight of Shazeer et al.'s load loss (needs noisy gating; they use 0.1).
        load_scope: ``micro_batch`` or ``global_batch``.

    Under ``global_batch`` the loss is that of every token of the optimizer step (all
    gradient-accumulation micro-batches on all data-parallel ranks): ``moekit train`` runs a
    routing pre-pass over the step first (one extra forward without gradients). Outside a
    step that prepares it (evaluation, a layer called on its own) it falls back to
    ``micro_batch``.
    """

    switch: float = 0.01
    switch_scope: BalanceScope = BalanceScope.MICRO_BATCH
    switch_sequence: float = 0.0
    z_loss: float = 0.0
    importance: float = 0.0
    importance_scope: BalanceScope = BalanceScope.MICRO_BATCH
    load: float = 0.0
    load_scope: BalanceScope = BalanceScope.MICRO_BATCH

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("switch", "switch_sequence", "z_loss", "importance", "load"):
            if getattr(self, name) < 0:
                raise ValueError(f"aux loss weight {name} must be >= 0, got {getattr(self, name)}")
        for name in ("importance_scope", "load_scope"):
            if getattr(self, name) is BalanceScope.SEQUENCE:
                raise ValueError(
                    f"aux_loss.{name} must be 'micro_batch' or 'global_batch' (the per-sequence "
                    "form is the Switch loss's)"
                )

    @property
    def global_batch(self) -> bool:
        """Whether a loss with a weight balances over the whole optimizer step."""
        return any(
            weight > 0 and scope is BalanceScope.GLOBAL_BATCH
            for weight, scope in (
                (self.switch, self.switch_scope),
                (self.importance, self.importance_scope),
                (self.load, self.load_scope),
            )
        )

    def weights(self) -> dict[str, float]:
        """The non-zero weights by loss name."""
        all_weights = {
            "switch": self.switch,
            "switch_sequence": self.switch_sequence,
            "z_loss": self.z_loss,
            "importance": self.importance,
            "load": self.load,
        }
        return {name: w for name, w in all_weights.items() if w > 0}
