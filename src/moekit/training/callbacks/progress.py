"""Progress: a bar in a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from moekit.training.callbacks.base import Callback
from moekit.training.callbacks.routing_health import worst_load
from moekit.training.run import StepOutput, TrainingRun


class Progress(Callback):
    """A progress bar in a terminal; outside one (a file, CI) a plain line at each evaluation
    and at most every 30 seconds otherwise, instead of hundreds of bar redraws."""

    def __init__(self, total: int, initial: int, *, desc: str, enabled: bool) -> None:
        self.enabled, self.desc, self.total = enabled, desc, total
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not self.interactive,
            leave=False,
            dynamic_ncols=True,
        )
        self.last_line = time.monotonic()

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        record = step.record if step.writes_record else {}
        if self.interactive:
            if record:
                val = {"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}
                worst = worst_load(record)
                if worst is not None:
                    val |= {"load": f"{worst[0]:.1f}x", "dead": str(worst[1])}
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", **val)
            self.bar.update(1)
            return
        due = step.is_eval or time.monotonic() - self.last_line >= 30.0
        if self.enabled and record and due:
            self.last_line = time.monotonic()
            val_text = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            worst = worst_load(record)
            load_text = "" if worst is None else f" load max {worst[0]:.2f}x dead {worst[1]}"
            print(
                f"{self.desc}: step {step.done}/{self.total} loss {record['loss']:.4f}"
                f"{val_text}{load_text}",
                file=sys.stderr,
                flush=True,
            )

    def on_train_end(self, run: TrainingRun) -> None:
        self.bar.close()
