"""Router z-loss (Zoph et al. 2022, ST-MoE, eq. 5)."""

from __future__ import annotations

import torch


def router_z_loss(
    logits_TE: torch.Tensor, *, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_z = (1/T) sum_x (log sum_i exp(logit_i(x)))^2``: keeps router logits small.

    Args:
        logits_TE: ``(T, E)`` router logits.
        token_mask_T: ``(T,)`` bool; padding is ignored.
    """
    z_T = torch.logsumexp(logits_TE.float() if logits_TE.dtype != torch.float64 else logits_TE, -1)
    sq_T = z_T.square()
    if token_mask_T is None:
        return sq_T.sum() / max(sq_T.numel(), 1)  # 0 for an empty batch, not NaN
    mask_T = token_mask_T.to(sq_T.dtype)
    return (sq_T * mask_T).sum() / mask_T.sum().clamp(min=1)
