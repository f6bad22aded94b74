"""Importance and load losses of Shazeer et al. 2017, "Outrageously Large Neural Networks".

Legend: T = tokens, E = experts, K = experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def cv_squared(values_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + eps)`` (population variance).

    Returns 0 for a single value.
    """
    if values_E.numel() <= 1:
        return values_E.new_zeros(())
    values_E = values_E.float() if values_E.dtype in (torch.float16, torch.bfloat16) else values_E
    return values_E.var(unbiased=False) / (values_E.mean() ** 2 + eps)


def _masked(values_TX: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    if token_mask_T is None:
        return values_TX
    return values_TX * token_mask_T.unsqueeze(-1).to(values_TX.dtype)


def importance_loss(
    weights_TK: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    num_experts: int,
    *,
    token_mask_T: torch.Tensor | None = None,
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``L_importance = CV(Importance)^2`` with ``Importance_i = sum_x G(x)_i``.

    ``G(x)`` is the sparse gate vector (the combine weights of the chosen experts, zero
    elsewhere), summed over the batch.

    Args:
        weights_TK: ``(T, K)`` combine weights.
        expert_idx_TK: ``(T, K)`` chosen experts.
        num_experts: E.
        token_mask_T: ``(T,)`` bool; padding is ignored.
        sum_across_ranks: with data/expert parallelism, a *differentiable* sum of the ``(E,)``
            importance over the ranks sharing the batch, so the CV² is the global batch's.
    """
    importance_E = _importance_E(weights_TK, expert_idx_TK, num_experts, token_mask_T)
    if sum_across_ranks is not None:
        importance_E = sum_across_ranks(importance_E)
    return cv_squared(importance_E)


def load_loss(
    clean_logits_TE: torch.Tensor,
    noisy_logits_TE: torch.Tensor,
    noise_std_TE: torch.Tensor,
    top_k: int,
    *,
    token_mask_T: torch.Tensor | None = None,
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``L_load = CV(Load)^2`` with the smooth load estimator of Shazeer et al. (Appendix A).

    ``P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i)``: the probability that expert
    i would still be in the top K if its noise were redrawn, where the threshold is the K-th
    largest noisy logit among the other experts (the (K+1)-th overall when i is in the top K,
    else the K-th). ``Load_i = sum_x P(x, i)``. Needs noisy gating in training mode.

    Args:
        clean_logits_TE: ``(T, E)`` ``x W_g``.
        noisy_logits_TE: ``(T, E)`` ``x W_g + noise``.
        noise_std_TE: ``(T, E)`` ``softplus(x W_noise)``.
        top_k: K (must be < E for the threshold to exist).
        token_mask_T: ``(T,)`` bool; padding is ignored.
        sum_across_ranks: a differentiable sum of the ``(E,)`` load over ranks (as for
            :func:`importance_loss`).
    """
    load_E = _load_E(clean_logits_TE, noisy_logits_TE, noise_std_TE, top_k, token_mask_T)
    if sum_across_ranks is not None:
        load_E = sum_across_ranks(load_E)
    return cv_squared(load_E)


def _importance_E(
    weights_TK: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    num_experts: int,
    token_mask_T: torch.Tensor | None,
) -> torch.Tensor:
    gates_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts)
    gates_TE = gates_TE.scatter_add(1, expert_idx_TK, weights_TK)
    return _masked(gates_TE, token_mask_T).sum(dim=0)


def _load_E(
    clean_logits_TE: torch.Tensor,
    noisy_logits_TE: torch.Tensor,
    noise_std_TE: torch.Tensor,
    top_k: int,
    token_mask_T: torch.Tensor | None,
) -> torch.Tensor:
    E = noisy_logits_TE.shape[-1]
    if not 1 <= top_k < E:
        raise ValueError(f"load_loss needs 1 <= top_k < num_experts={E}, got top_k={top_k}")
    top_T2 = noisy_logits_TE.topk(top_k + 1, dim=-1).values
    kth_T1 = top_T2[:, top_k - 1 : top_k]  # K-th largest
    kplus1_T1 = top_T2[:, top_k : top_k + 1]  # (K+1)-th largest
    in_top_TE = noisy_logits_TE >= kth_T1
    threshold_TE = torch.where(in_top_TE, kplus1_T1, kth_T1)
    # the standard normal CDF (torch.distributions.Normal would validate its arguments: syncs)
    prob_TE = torch.special.ndtr((clean_logits_TE - threshold_TE) / noise_std_TE.clamp(min=1e-9))
    return _masked(prob_TE, token_mask_T).sum(dim=0)


def importance_sums(routing, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """``(E,)`` importance of a routing decision (the sums :func:`importance_loss` takes the
    CV² of): combine weights of real assignments summed per expert."""
    gates_TK = routing.weights_TK
    if routing.assignment_mask_TK is not None:
        gates_TK = gates_TK * routing.assignment_mask_TK
    return _importance_E(gates_TK, routing.expert_idx_TK, routing.num_experts, token_mask_T)


def load_sums(routing, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """``(E,)`` smooth load estimate of a noisy-gating routing decision (what
    :func:`load_loss` takes the CV² of)."""
    return _load_E(
        routing.clean_logits_TE,
        routing.logits_TE,
        routing.noise_std_TE,
        routing.top_k,
        token_mask_T,
    )
