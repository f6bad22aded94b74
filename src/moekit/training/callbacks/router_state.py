"""The routers' state updates after each optimizer step."""

from __future__ import annotations

from moekit.layers.switches import (
    update_expert_bias,
    update_expert_thresholds,
    update_null_offsets,
)
from moekit.training.callbacks.base import Callback
from moekit.training.run import StepOutput, TrainingRun


class RouterStateUpdate(Callback):
    """The routers' state updates after each optimizer step: the auxiliary-loss-free bias of
    every bias-balancing router (DeepSeek-V3), the thresholds of every Expert-Threshold router
    and the zero-expert offsets steered to a target (tallies summed over the ranks first)."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        update_expert_bias(run.model)
        update_expert_thresholds(run.model)
        update_null_offsets(run.model)


BiasUpdate = RouterStateUpdate  # its name before it also updated thresholds and offsets
