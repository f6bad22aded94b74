"""The metrics line of record steps: the only place a step's device values are read."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moekit.training.callbacks.base import Callback
from moekit.training.objective import moe_record
from moekit.training.run import StepOutput, TrainingRun


class Metrics(Callback):
    """A metrics line (``metrics.jsonl``, TensorBoard, ``on_record``) on record steps; the only
    place the step's device values are read. Throughput is over the steps since the last line
    (the device catches up on record steps only)."""

    def __init__(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_record = on_record
        self.window_seconds = 0.0
        self.window_tokens = 0

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        self.window_seconds += step.seconds
        self.window_tokens += step.tokens
        if not step.writes_record:
            return
        loss = step.loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} by step {step.done}")
        record: dict[str, Any] = {
            "step": step.done,
            "loss": loss,
            "aux_loss": step.aux_loss.item(),
            "lr": step.lr,
            "grad_norm": float("nan") if step.grad_norm is None else step.grad_norm.item(),
            "tokens_per_second": self.window_tokens / self.window_seconds,
            "moe": moe_record(step.moe_outputs),
            "train_seconds": run.result.train_time,  # training steps so far (no evaluation)
        }
        self.window_seconds, self.window_tokens = 0.0, 0
        record.update(step.record)  # val_loss, and whatever earlier callbacks added
        step.record = record
        run.log.write(record)
        if self.on_record is not None:
            self.on_record(record)

    def on_train_end(self, run: TrainingRun) -> None:
        run.log.close()
