"""Which parameters train on a step: the alternating schedule and freezing by dropping
gradients. Shared by the classic mixtures (``moekit.classic.methods``) and the language model's
training methods (``moekit.training.methods``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

from moekit.utils.validation import check_fields


class TrainingMethod(str, Enum):
    """How a mixture trains: the one list for the language model (``TrainConfig.method``) and
    the classic mixtures (``fit_mixture``). ``em`` (expectation-maximisation) is the classic
    mixtures' only: a language model refuses it."""

    JOINT = "joint"
    GRADIENT = "gradient"
    SEPARATE = "separate"
    ALTERNATING = "alternating"
    EM = "em"
    EVOLUTIONARY = "evolutionary"


@dataclass(kw_only=True)
class AlternatingSchedule:
    """Blocks of ``expert_steps`` steps with the router frozen, then ``router_steps`` with the
    experts frozen, repeated (experts first)."""

    expert_steps: int = 10
    router_steps: int = 10

    def __post_init__(self) -> None:
        check_fields(self)
        if self.expert_steps < 1 or self.router_steps < 1:
            raise ValueError(
                "expert_steps and router_steps must be >= 1, got "
                f"{self.expert_steps} and {self.router_steps}"
            )

    def trains_router(self, step: int) -> bool:
        """Whether step ``step`` (from 0) trains the router (else the experts)."""
        return step % (self.expert_steps + self.router_steps) >= self.expert_steps


def drop_gradients(parameters: list[nn.Parameter]) -> None:
    """Freeze for this step: no gradient, so optimizers leave the tensors (and their state)
    untouched. Dropping gradients rather than flipping ``requires_grad`` works under DDP too."""
    for p in parameters:
        p.grad = None
