"""The hook the training loop calls after every optimizer step and at the end."""

from __future__ import annotations

from moekit.training.run import StepOutput, TrainingRun


class Callback:
    """A hook of the training loop: called after every optimizer step and at the end."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        pass

    def on_train_end(self, run: TrainingRun) -> None:
        pass
