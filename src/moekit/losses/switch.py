"""Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4; also GShard's l_aux).

Legend: T = tokens, E = experts, K = experts per token, B = sequences, S = tokens per sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def switch_load_balancing_loss(
    probs_TE: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    *,
    token_mask_T: torch.Tensor | None = None,
    sequence_length: int | None = None,
    assignment_mask_TK: torch.Tensor | None = None,
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``L = E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the T*K assignments that chose expert i (so ``sum_i f_i = 1``) and
    ``P_i`` the mean router probability of expert i. A perfectly uniform router gives exactly 1
    whatever it picks; the minimum under balanced routing is 1. Gradients flow through ``P`` only.
    (Hugging Face's ``load_balancing_loss_func`` counts ``f`` per choice slot and so reports K
    times this value.)

    With ``sequence_length`` S, the loss is computed within each sequence of S consecutive tokens
    and averaged over sequences (the sequence-wise balance loss of DeepSeek-V2/V3).

    Args:
        probs_TE: ``(T, E)`` router probabilities (rows sum to 1).
        expert_idx_TK: ``(T, K)`` chosen experts.
        token_mask_T: ``(T,)`` bool, ``True`` for real tokens; padding is ignored.
        sequence_length: S for the per-sequence form (T must be a multiple of S).
        assignment_mask_TK: ``(T, K)`` bool, ``False`` for empty slots (variable-k routers);
            ``f`` is then the fraction of the real assignments.
        sum_across_ranks: with data/expert parallelism, sums the (non-differentiable) expert
            counts over ranks so ``f`` is global; ``P`` stays local, and averaging each rank's
            gradient (as DDP does) then gives the gradient of the global loss.

    Returns:
        Scalar loss.
    """
    T, E = probs_TE.shape
    K = expert_idx_TK.shape[-1]
    if T == 0:  # an empty batch has nothing to balance
        return probs_TE.sum() * 0.0
    S = T if sequence_length is None else sequence_length
    if S < 1 or T % S:
        raise ValueError(f"sequence_length={sequence_length} must divide the token count {T}")
    B = T // S
    mask_T = (
        torch.ones(T, dtype=probs_TE.dtype, device=probs_TE.device)
        if token_mask_T is None
        else token_mask_T.to(probs_TE.dtype)
    )
    mask_BS = mask_T.view(B, S)
    valid_B = mask_BS.sum(dim=1)
    slot_weight_BA = mask_BS.repeat_interleave(K, dim=1)
    if assignment_mask_TK is not None:
        slot_weight_BA = slot_weight_BA * assignment_mask_TK.reshape(B, S * K).to(probs_TE.dtype)
    counts_BE = torch.zeros(B, E, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_BE.scatter_add_(1, expert_idx_TK.reshape(B, S * K), slot_weight_BA)
    if sum_across_ranks is not None:
        counts_BE = sum_across_ranks(counts_BE)
    denom_B = valid_B.clamp(min=1)
    f_BE = counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp(min=1)
    P_BE = (probs_TE.view(B, S, E) * mask_BS.unsqueeze(-1)).sum(dim=1) / denom_B.unsqueeze(-1)
    loss_B = E * (f_BE * P_BE).sum(dim=-1)
    has_tokens_B = valid_B > 0
    return (loss_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1)
