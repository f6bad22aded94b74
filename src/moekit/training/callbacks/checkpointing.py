"""Checkpoints every ``checkpoint_every`` steps and at the last step."""

from __future__ import annotations

from moekit.training.callbacks.base import Callback
from moekit.training.run import StepOutput, TrainingRun, save_run_checkpoint
from moekit.utils.serialization import config_to_dict


class Checkpointing(Callback):
    """A checkpoint every ``checkpoint_every`` steps and at the last step."""

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        every = run.config.checkpoint_every
        if (every and step.done % every == 0) or step.done == run.last_step:
            save_run_checkpoint(
                run.ctx,
                run.device,
                run.out_dir / "checkpoints",
                step.done,
                run.model,
                run.optimizer,
                run.scheduler,
                config_to_dict(run.config),
            )
