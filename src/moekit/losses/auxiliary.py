"""The auxiliary losses an MoE layer's config asks for, from one routing decision.

Legend: T = tokens, E = experts, K = expert slots per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.losses.config import AuxLossConfig, BalanceScope
from moekit.losses.shazeer import importance_loss, load_loss
from moekit.losses.switch import switch_load_balancing_loss
from moekit.losses.z_loss import router_z_loss
from moekit.routing.result import RoutingResult


def auxiliary_losses(
    routing: RoutingResult,
    config: AuxLossConfig,
    *,
    token_mask_T: torch.Tensor | None = None,
    sequence_length: int | None = None,
    global_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    differentiable_global_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each loss with a non-zero weight in ``config``, unweighted, by name.

    Args:
        routing: the router's decision for T tokens.
        config: which losses (Switch, z-loss, Shazeer importance and load) and their weights.
        token_mask_T: ``(T,)`` bool, ``True`` for real tokens; padding is left out.
        sequence_length: S, for the per-sequence Switch loss (``switch_scope='sequence'``).
        global_sum: sums expert counts over the processes sharing the batch (expert/data
            parallelism), so the Switch loss's ``f`` is global.
        differentiable_global_sum: the same sum with a gradient (an autograd all-reduce), for
            the Shazeer losses' importance and load, whose CV² is then the global batch's.
    """
    weights = config.weights()
    losses: dict[str, torch.Tensor] = {}
    if "switch" in weights:
        per_sequence = config.switch_scope is BalanceScope.SEQUENCE
        losses["switch"] = switch_load_balancing_loss(
            routing.probs_TE,
            routing.expert_idx_TK,
            token_mask_T=token_mask_T,
            sequence_length=sequence_length if per_sequence else None,
            assignment_mask_TK=routing.assignment_mask_TK,
            sum_across_ranks=None if per_sequence else global_sum,
        )
    if "z_loss" in weights:
        losses["z_loss"] = router_z_loss(routing.logits_TE, token_mask_T=token_mask_T)
    if "importance" in weights:
        gates_TK = routing.weights_TK
        if routing.assignment_mask_TK is not None:
            gates_TK = gates_TK * routing.assignment_mask_TK
        losses["importance"] = importance_loss(
            gates_TK,
            routing.expert_idx_TK,
            routing.num_experts,
            token_mask_T=token_mask_T,
            sum_across_ranks=differentiable_global_sum,
        )
    if "load" in weights and routing.noise_std_TE is not None:
        assert routing.clean_logits_TE is not None
        losses["load"] = load_loss(
            routing.clean_logits_TE,
            routing.logits_TE,
            routing.noise_std_TE,
            routing.top_k,
            token_mask_T=token_mask_T,
            sum_across_ranks=differentiable_global_sum,
        )
    return losses


def weighted_sum(
    losses: dict[str, torch.Tensor], config: AuxLossConfig, start: torch.Tensor
) -> torch.Tensor:
    """``sum_name weight_name * loss_name``, added to ``start`` (a scalar on the right device)."""
    weights = config.weights()
    return sum((weights[name] * value for name, value in losses.items()), start=start)
