"""The direct expert path for a handful of tokens on the CPU (batch-1 and small-batch decoding).

With one or a few tokens the sort-and-group dispatch is all overhead: an argsort, a gather, a
grouped matmul over E groups of which E - k are empty, an ``index_add``. Here each chosen
expert runs on its token as two matrix-vector products on views of the stacked weights (no copy
of a weight), read from the host: free on the CPU, where this path is taken, and a device sync
elsewhere, where it is not. The bound ``DIRECT_MAX_ASSIGNMENTS`` keeps it to decoding-sized
calls; its result equals the dispatch's (tested).

Inside ``torch.compile`` (a compiled decoding step): on the CPU this path stays eager (a graph
break; reading the host is free there, and gathering the chosen experts' weights would copy
them every token); elsewhere nothing may be read on the host, so the chosen experts' weights
are gathered and run as batched matrix products (:func:`direct_experts_gathered`: fixed
shapes, capturable as a CUDA graph).
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.experts.activations import apply_activation
from moekit.experts.bank import ExpertBank
from moekit.routing.result import RoutingResult

DIRECT_MAX_ASSIGNMENTS = 16  # token-expert assignments per call


def direct_applies(x_TD: torch.Tensor, routing: RoutingResult, experts: Any) -> bool:
    """Whether the direct path serves this call: a plain expert bank (no adapter, no dropout in
    training) on the CPU or inside ``torch.compile``, at most ``DIRECT_MAX_ASSIGNMENTS``
    assignments."""
    return (
        (x_TD.device.type == "cpu" or torch.compiler.is_compiling())
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
    weights_TK = routing.weights_TK.to(x_TD.dtype)
    if torch.compiler.is_compiling():
        real_TK = routing.expert_idx_TK < num_experts
        if routing.assignment_mask_TK is not None:
            real_TK = real_TK & routing.assignment_mask_TK
        if token_mask_T is not None:
            real_TK = real_TK & token_mask_T.unsqueeze(-1)
        if x_TD.device.type != "cpu":
            return direct_experts_gathered(
                x_TD, routing.expert_idx_TK, weights_TK, real_TK, experts
            )
        return _on_views_outside_graphs(
            x_TD, routing.expert_idx_TK, weights_TK, real_TK, experts, num_experts
        )
    # eager: the masks go to the host with the indices (no mask arithmetic on tensors)
    used_TK = routing.assignment_mask_TK
    if token_mask_T is not None:
        token_TK = token_mask_T.unsqueeze(-1).expand_as(routing.expert_idx_TK)
        used_TK = token_TK if used_TK is None else used_TK & token_TK
    return _on_views(x_TD, routing.expert_idx_TK, weights_TK, used_TK, experts, num_experts)


def _on_views(
    x_TD: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    used_TK: torch.Tensor | None,
    experts: ExpertBank,
    num_experts: int,
) -> torch.Tensor:
    """Each used slot's expert on its token, on views of the stacked weights (host reads, one
    per tensor): ``y_t += w · act(x_t W_in[e] + b_in[e]) W_out[e] (+ w · b_out[e])``, the
    router weight folded into the second product (``addmm_``'s ``alpha``). A slot is used when
    its expert is real (``< num_experts``) and ``used_TK`` (``None``: every slot) allows it."""
    y_TD = torch.zeros_like(x_TD)
    chosen, weights = expert_idx_TK.tolist(), weights_TK.tolist()
    used = None if used_TK is None else used_TK.tolist()
    b_in, b_out = experts.b_in_EH, experts.b_out_ED
    w_in, w_out, activation = experts.w_in_EDH, experts.w_out_EHD, experts.activation
    single = len(chosen) == 1  # batch-1 decoding: the token's row is the whole tensor
    for t, row in enumerate(chosen):  # at most DIRECT_MAX_ASSIGNMENTS slots in all
        x_1D, y_1D = (x_TD, y_TD) if single else (x_TD[t : t + 1], y_TD[t : t + 1])
        for j, e in enumerate(row):
            if e >= num_experts or (used is not None and not used[t][j]):
                continue
            h_1H = torch.mm(x_1D, w_in[e])
            if b_in is not None:
                h_1H = h_1H + b_in[e]
            y_1D.addmm_(apply_activation(activation, h_1H), w_out[e], alpha=weights[t][j])
            if b_out is not None:
                y_1D.add_(b_out[e], alpha=weights[t][j])
    return y_TD


@torch.compiler.disable
def _on_views_outside_graphs(
    x_TD: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    used_TK: torch.Tensor,
    experts: ExpertBank,
    num_experts: int,
) -> torch.Tensor:
    """:func:`_on_views` as a graph break inside a compiled CPU step (it reads the host)."""
    return _on_views(x_TD, expert_idx_TK, weights_TK, used_TK, experts, num_experts)


def direct_experts_gathered(
    x_TD: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    used_TK: torch.Tensor,
    experts: ExpertBank,
) -> torch.Tensor:
    """:func:`direct_experts` without host reads: each slot's expert weights gathered
    ``(T, K, D, H)`` and applied as batched products (fixed shapes: capturable)."""
    idx_TK = expert_idx_TK.clamp(0, experts.num_experts - 1)  # unused slots: any expert, weight 0
    h_TKH = torch.einsum("td,tkdh->tkh", x_TD, experts.w_in_EDH[idx_TK].to(x_TD.dtype))
    if experts.b_in_EH is not None:
        h_TKH = h_TKH + experts.b_in_EH[idx_TK].to(x_TD.dtype)
    a_TKH = apply_activation(experts.activation, h_TKH)
    y_TKD = torch.einsum("tkh,tkhd->tkd", a_TKH, experts.w_out_EHD[idx_TK].to(x_TD.dtype))
    if experts.b_out_ED is not None:
        y_TKD = y_TKD + experts.b_out_ED[idx_TK].to(x_TD.dtype)
    scale_TK = torch.where(used_TK, weights_TK, torch.zeros_like(weights_TK))
    return (y_TKD * scale_TK.unsqueeze(-1)).sum(dim=1)
