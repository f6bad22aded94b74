"""The validation loss on evaluation steps."""

from __future__ import annotations

from moekit.training.callbacks.base import Callback
from moekit.training.objective import evaluate
from moekit.training.run import StepOutput, TrainingRun


class Evaluation(Callback):
    """Validation loss every ``eval_every`` steps and at the end, into the step's record."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        if step.is_eval:
            data = run.config.data
            step.record["val_loss"] = evaluate(
                run.model, run.val_stream, run.config.eval_batches, data.batch_size, data.seq_len
            )
