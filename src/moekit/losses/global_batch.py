"""Load balancing over the whole optimizer step: every gradient-accumulation micro-batch on
every data-parallel rank (``scope = "global_batch"``; Megatron's ``global_aux_loss``, Qiu et
al. 2025, arXiv 2501.11873).

Legend: T = tokens of a micro-batch on one rank, E = experts, K = expert slots per token.

A balance loss over the global batch ``L(s)`` is a function of sums ``s`` over all its tokens
(expert counts and router-probability sums for the Switch loss, gate sums for importance, the
load estimate for load). A micro-batch only knows its own part ``s_k``. Before the step, a
routing pre-pass (no gradients) sums every micro-batch's parts over the step and the ranks
(:class:`BalanceTally` -> :class:`GlobalBalance`). Each micro-batch then adds the surrogate

    ``L(s) + scale · <dL/ds(s), s_k - stop_grad(s_k)>``

whose value is ``L(s)`` and whose gradient, summed over the micro-batches and averaged as the
training loop averages them (``/ grad_accum``, ``/ ranks``; ``scale`` undoes both), is exactly
the gradient of ``L`` on one batch holding every token. The pre-pass must not touch the DeepSeek
bias tally (it would count the step twice); the layer skips it while tallying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit.losses.shazeer import cv_squared, importance_sums, load_sums
from moekit.routing.result import RoutingResult


def _masked_rows(values_TX: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    if token_mask_T is None:
        return values_TX
    return values_TX * token_mask_T.unsqueeze(-1).to(values_TX.dtype)


def switch_sums(
    routing: RoutingResult, token_mask_T: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(assignments per expert (E,), real tokens (), router-probability sums (E,))``."""
    T, E = routing.probs_TE.shape
    weight_TK = torch.ones_like(routing.expert_idx_TK, dtype=routing.probs_TE.dtype)
    if routing.assignment_mask_TK is not None:
        weight_TK = weight_TK * routing.assignment_mask_TK.to(weight_TK.dtype)
    weight_TK = _masked_rows(weight_TK, token_mask_T)
    counts_E = routing.probs_TE.new_zeros(E).index_add_(
        0, routing.expert_idx_TK.reshape(-1), weight_TK.reshape(-1)
    )
    tokens = (
        routing.probs_TE.new_tensor(float(T))
        if token_mask_T is None
        else token_mask_T.to(routing.probs_TE.dtype).sum()
    )
    return counts_E, tokens, _masked_rows(routing.probs_TE, token_mask_T).sum(dim=0)


@dataclass
class BalanceTally:
    """Running sums of a layer's routing over the pre-pass (values only)."""

    counts_E: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    prob_sum_E: torch.Tensor | None = None
    importance_E: torch.Tensor | None = None
    load_E: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, routing: RoutingResult, token_mask_T: torch.Tensor | None) -> None:
        """Add one micro-batch's routing."""
        parts = {}
        parts["counts_E"], parts["tokens"], parts["prob_sum_E"] = switch_sums(routing, token_mask_T)
        parts["importance_E"] = importance_sums(routing, token_mask_T)
        if routing.noise_std_TE is not None and routing.clean_logits_TE is not None:
            parts["load_E"] = load_sums(routing, token_mask_T)
        for name, value in parts.items():
            value = value.detach().float()
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)

    def finish(
        self, global_sum: Callable[[torch.Tensor], torch.Tensor], scale: float
    ) -> GlobalBalance:
        """Sum over the ranks sharing the batch; ``scale``: micro-batches × data-parallel
        ranks."""
        assert self.counts_E is not None and self.tokens is not None
        assert self.prob_sum_E is not None and self.importance_E is not None
        return GlobalBalance(
            counts_E=global_sum(self.counts_E),
            tokens=global_sum(self.tokens),
            prob_sum_E=global_sum(self.prob_sum_E),
            importance_E=global_sum(self.importance_E),
            load_E=None if self.load_E is None else global_sum(self.load_E),
            scale=scale,
        )


@dataclass
class GlobalBalance:
    """The step's sums for one layer (every micro-batch, every rank)."""

    counts_E: torch.Tensor
    tokens: torch.Tensor
    prob_sum_E: torch.Tensor
    importance_E: torch.Tensor
    load_E: torch.Tensor | None
    scale: float
    _cache: dict = field(default_factory=dict, repr=False)


def _surrogate(
    value: torch.Tensor, grad: torch.Tensor, local: torch.Tensor, scale: float
) -> torch.Tensor:
    """``value + scale · <grad, local - stop_grad(local)>``: the value of the global loss, the
    gradient of this micro-batch's share of it."""
    return value + scale * (grad.to(local.dtype) * (local - local.detach())).sum()


def _cv_squared_and_gradient(sums_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        s = sums_E.detach().clone().requires_grad_(True)
        value = cv_squared(s)
        (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def global_switch_loss(
    routing: RoutingResult, balance: GlobalBalance, token_mask_T: torch.Tensor | None
) -> torch.Tensor:
    """The Switch loss ``E · sum_i f_i P_i`` of the global batch (value), with this
    micro-batch's gradient (``f`` is constant, ``P`` linear in the probability sums)."""
    E = routing.probs_TE.shape[-1]
    f_E = balance.counts_E / balance.counts_E.sum().clamp(min=1)
    tokens = balance.tokens.clamp(min=1)
    value = E * (f_E * balance.prob_sum_E / tokens).sum()
    _, _, local_prob_sum_E = switch_sums(routing, token_mask_T)
    return _surrogate(value, E * f_E / tokens, local_prob_sum_E, balance.scale)


def global_importance_loss(
    routing: RoutingResult, balance: GlobalBalance, token_mask_T: torch.Tensor | None
) -> torch.Tensor:
    """Shazeer's importance loss ``CV²(importance)`` of the global batch."""
    value, grad = _cv_squared_and_gradient(balance.importance_E)
    return _surrogate(value, grad, importance_sums(routing, token_mask_T), balance.scale)


def global_load_loss(
    routing: RoutingResult, balance: GlobalBalance, token_mask_T: torch.Tensor | None
) -> torch.Tensor:
    """Shazeer's load loss ``CV²(load)`` of the global batch (noisy gating)."""
    assert balance.load_E is not None
    value, grad = _cv_squared_and_gradient(balance.load_E)
    return _surrogate(value, grad, load_sums(routing, token_mask_T), balance.scale)
