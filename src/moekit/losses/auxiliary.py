"""The auxiliary losses an MoE layer's config asks for, from one routing decision.

Legend: T = tokens, E = experts, K = expert slots per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.losses.config import AuxLossConfig, BalanceScope
from moekit.losses.global_batch import (
    GlobalBalance,
    global_importance_loss,
    global_load_loss,
    global_switch_loss,
)
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
    global_balance: GlobalBalance | None = None,
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
        global_balance: the optimizer step's sums (``moekit.losses.global_batch``) for the
            losses whose scope is ``global_batch``; without it those use ``micro_batch``.
    """
    weights = config.weights()
    losses: dict[str, torch.Tensor] = {}
    over_step = global_balance is not None
    if "switch" in weights:
        if over_step and config.switch_scope is BalanceScope.GLOBAL_BATCH:
            assert global_balance is not None
            losses["switch"] = global_switch_loss(routing, global_balance, token_mask_T)
        else:
            per_sequence = config.switch_scope is BalanceScope.SEQUENCE
            losses["switch"] = switch_load_balancing_loss(
                routing.probs_TE,
                routing.expert_idx_TK,
                token_mask_T=token_mask_T,
                sequence_length=sequence_length if per_sequence else None,
                assignment_mask_TK=routing.assignment_mask_TK,
                sum_across_ranks=None if per_sequence else global_sum,
            )
    if "switch_sequence" in weights:
        losses["switch_sequence"] = switch_load_balancing_loss(
            routing.probs_TE,
            routing.expert_idx_TK,
            token_mask_T=token_mask_T,
            sequence_length=sequence_length,
            assignment_mask_TK=routing.assignment_mask_TK,
        )
    if "z_loss" in weights:
        losses["z_loss"] = router_z_loss(routing.logits_TE, token_mask_T=token_mask_T)
    if (
        "importance" in weights
        and over_step
        and config.importance_scope is BalanceScope.GLOBAL_BATCH
    ):
        assert global_balance is not None
        losses["importance"] = global_importance_loss(routing, global_balance, token_mask_T)
    elif "importance" in weights:
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
    global_load = over_step and config.load_scope is BalanceScope.GLOBAL_BATCH
    if "load" in weights and routing.noise_std_TE is not None and global_load:
        assert global_balance is not None and global_balance.load_E is not None
        losses["load"] = global_load_loss(routing, global_balance, token_mask_T)
    elif "load" in weights and routing.noise_std_TE is not None:
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
