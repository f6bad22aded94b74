"""Auxiliary-loss-free load balancing (DeepSeek-V3; Wang et al. 2024) applied to a whole model.

Call :func:`update_expert_bias` once after each optimizer step; each router with
``bias_balancing=True`` nudges its selection-only bias toward even load by a fixed rate.
"""

from __future__ import annotations

from torch import nn

from moekit.routing.topk import TopKRouter


def update_expert_bias(model: nn.Module, rate: float | None = None) -> int:
    """Update every bias-balancing router in ``model``; returns how many routers were updated.

    Args:
        model: any module containing moekit routers.
        rate: override each router's configured ``bias_update_rate``.
    """
    updated = 0
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.expert_bias_E is not None:
            module.update_expert_bias(rate)
            updated += 1
    return updated
