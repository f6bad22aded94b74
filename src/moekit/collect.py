"""Collect every MoE layer's output inside any model: one call for all auxiliary losses.

    with collect_moe_outputs(model) as moe_outputs:
        logits = model(x)
    loss = task_loss + moe_outputs.aux_loss()

Forward hooks are registered on entry and removed on exit; nothing is stored globally.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moekit.analysis.routing_stats import RoutingStats
from moekit.layers import MoE, MoEOutput
from moekit.layers import set_statistics as set_statistics  # its former home; still importable


class MoEOutputCollector:
    """The MoE outputs seen during a ``collect_moe_outputs`` block, by module name."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[MoEOutput]] = {}
        self.nested: set[str] = set()  # MoE layers inside another MoE (hierarchical experts)

    def aux_loss(self) -> torch.Tensor:
        """Sum of every collected call's weighted auxiliary loss (0 if none). Nested MoE layers
        are not added again: their losses are already inside their parent's ``aux_loss``."""
        device = next((c[0].aux_loss.device for c in self.outputs.values() if c), None)
        total = torch.zeros((), device=device)
        for name, calls in self.outputs.items():
            if name in self.nested:
                continue
            for out in calls:
                total = total + out.aux_loss
        return total

    def stats(self) -> dict[str, RoutingStats]:
        """The last call's routing statistics of each MoE layer (layers with statistics off
        are left out)."""
        return {
            name: stats
            for name, calls in self.outputs.items()
            if calls and (stats := calls[-1].stats) is not None
        }

    def clear(self) -> None:
        self.outputs.clear()


@contextmanager
def collect_moe_outputs(model: nn.Module) -> Iterator[MoEOutputCollector]:
    """Record the ``MoEOutput`` of every ``MoE`` module in ``model`` (nested ones included)."""
    collector = MoEOutputCollector()
    handles = []
    moe_names = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    collector.nested = {
        name
        for name in moe_names
        if any(p != name and (p == "" or name.startswith(p + ".")) for p in moe_names)
    }
    for name, module in model.named_modules():
        if isinstance(module, MoE):

            def hook(_module, _args, output, name=name or "<root>"):
                collector.outputs.setdefault(name, []).append(output)

            handles.append(module.register_forward_hook(hook))
    try:
        yield collector
    finally:
        for handle in handles:
            handle.remove()
