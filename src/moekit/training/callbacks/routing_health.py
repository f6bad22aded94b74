"""A warning when a layer's routing collapses."""

from __future__ import annotations

import sys
from typing import Any

from moekit.training.callbacks.base import Callback
from moekit.training.run import StepOutput, TrainingRun


def worst_load(record: dict[str, Any]) -> tuple[float, int] | None:
    """``(largest expert load × the equal share, most dead experts)`` over the record's MoE
    layers, or ``None`` without statistics."""
    loads = [m["load"] for m in record.get("moe", []) if "load" in m]
    if not loads:
        return None
    return max(load["max"] for load in loads), max(int(load["dead"]) for load in loads)


class RoutingHealth(Callback):
    """Warns once per layer when its routing collapses, on record steps: half or more of its
    experts dead (each below 1% of an equal share of the assignments). The record gets
    ``routing_collapse`` (the layers). Fine-tuning a Hub MoE without balancing ends there
    unnoticed otherwise. (A busiest-expert threshold was tried and left out: with top-k an
    expert chosen by every token is at ``E / k`` times the equal share, which tiny healthy
    models reach early.)"""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.warned: set[int] = set()

    def on_step_end(self, run: TrainingRun, step: StepOutput) -> None:
        if not step.writes_record:
            return
        collapsed = []
        for layer, moe in enumerate(step.record.get("moe", [])):
            counts, load = moe.get("tokens_per_expert"), moe.get("load")
            if not counts or load is None or len(counts) < 2:
                continue
            E = len(counts)
            if load["dead"] >= E / 2:
                collapsed.append(layer)
                if self.enabled and layer not in self.warned:
                    self.warned.add(layer)
                    print(
                        f"warning: routing in MoE layer {layer} collapsed by step {step.done}: "
                        f"{load['dead']} of {E} experts dead, the busiest at {load['max']:.1f}x "
                        "the equal share (threshold: half the experts below 1% of an equal "
                        "share); raise model.moe.layer.aux_loss.switch",
                        file=sys.stderr,
                        flush=True,
                    )
        if collapsed:
            step.record["routing_collapse"] = collapsed
