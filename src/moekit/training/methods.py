"""Training methods for the MoE language model: which parameter group trains at each step.

``joint``/``gradient`` train everything; ``alternating`` trains experts (and the non-MoE
parameters) with the routers frozen, then the routers alone, in blocks
(``TrainConfig.alternating``); ``separate`` trains everything but the routers for the first
``separate_expert_steps`` steps (each expert on the tokens the initial router sends it: its own
partition), then the routers alone. ``evolutionary`` searches router configurations, each
candidate trained jointly (``moekit.training.evolution``); ``em`` belongs to the classic
mixtures (``moekit.classic.methods``) and is refused with the reason.
"""

from __future__ import annotations

from torch import nn

from moekit.layers import MoE
from moekit.utils.schedule import AlternatingSchedule, TrainingMethod, drop_gradients

__all__ = [
    "AlternatingSchedule",
    "TrainingMethod",
    "drop_gradients",
    "frozen_groups",
    "lm_parameter_groups",
]


def lm_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``router``: every MoE layer's router; ``experts``: routed and shared experts; ``other``:
    the rest (embeddings, attention, norms, dense FFNs)."""
    model = getattr(model, "module", model)
    router, experts = [], []
    for module in model.modules():
        if isinstance(module, MoE):
            router += list(module.router.parameters())
            experts += list(module.experts.parameters())
            if module.shared_experts is not None:
                experts += list(module.shared_experts.parameters())
    taken = {id(p) for p in router + experts}
    other = [p for p in model.parameters() if id(p) not in taken]
    return {"router": router, "experts": experts, "other": other}


def frozen_groups(
    method: TrainingMethod,
    step: int,
    *,
    schedule: AlternatingSchedule,
    separate_expert_steps: int,
) -> tuple[str, ...]:
    """The groups that step ``step`` (from 0) leaves unchanged."""
    if method in (TrainingMethod.JOINT, TrainingMethod.GRADIENT):
        return ()
    if method is TrainingMethod.ALTERNATING:
        return ("experts", "other") if schedule.trains_router(step) else ("router",)
    if method is TrainingMethod.SEPARATE:
        return ("router",) if step < separate_expert_steps else ("experts", "other")
    raise ValueError(
        f"method={method.value!r} searches router configurations "
        "(moekit.training.evolution.train_evolved); a training step is 'joint', 'gradient', "
        "'separate' or 'alternating'"
    )
