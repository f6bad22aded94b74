"""The direct expert path for a handful of tokens on the CPU (batch-1 and small-batch decoding).

With one or a few tokens the sort-and-group dispatch is all overhead: an argsort, a gather, a
grouped matmul over E groups of which E - k are empty, an ``index_add``. Here each chosen
expert runs on its token as two matrix-vector products on views of the stacked weights (no copy
of a weight), read from the host: free on the CPU, where this path is taken, and a device sync
elsewhere, where it is not. The bound ``DIRECT_MAX_ASSIGNMENTS`` keeps it to decoding-sized
calls; its result equals the dispatch's (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.experts.bank import ExpertBank
from moekit.routing.result import RoutingResult

DIRECT_MAX_ASSIGNMENTS = 16  # token-expert assignments per call


def direct_applies(x_TD: torch.Tensor, routing: RoutingResult, experts: Any) -> bool:
    """Whether the direct path serves this call: a plain expert bank (no adapter, no dropout in
    training) on the CPU, at most ``DIRECT_MAX_ASSIGNMENTS`` assignments."""
    return (
        x_TD.device.type == "cpu"
        and routing.expert_idx_TK.numel() <= DIRECT_MAX_ASSIGNMENTS
        and type(experts) is ExpertBank
        and experts.adapter is None
        and not (experts.training and experts.dropout > 0)
    )


def direct_experts(
    x_TD: torch.Tensor,
    routing: RoutingResult,
    experts: ExpertBank,
    num_experts: int,
    token_mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(T, D)``: ``Σ_j w[t, j] · expert_{e[t, j]}(x_t)`` over each token's used slots with a
    real expert (``< num_experts``), padding excluded; what the dispatcher computes dropless."""
    y_TD = torch.zeros_like(x_TD)
    used_TK = routing.expert_idx_TK < num_experts
    if routing.assignment_mask_TK is not None:
        used_TK = used_TK & routing.assignment_mask_TK
    if token_mask_T is not None:
        used_TK = used_TK & token_mask_T.unsqueeze(-1)
    weights_TK = routing.weights_TK.to(x_TD.dtype)
    for t, j in used_TK.nonzero().tolist():  # at most DIRECT_MAX_ASSIGNMENTS pairs
        e = int(routing.expert_idx_TK[t, j])
        y_TD[t] += weights_TK[t, j] * experts.forward_one(e, x_TD[t : t + 1])[0]
    return y_TD
