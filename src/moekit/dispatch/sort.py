"""Local dispatch by sorting: group token-expert assignments by expert, run, scatter back.

Legend: T = tokens, D = d_model, E = experts, K = experts per token, A = T*K assignments,
M = kept assignments (A minus padding and drops), sorted by expert.

No dense (T, E, C) tensors: assignments are ordered by one stable argsort (after a priority
sort when capacity applies) and an over-full expert's tail is cut; ``Dispatcher.run``
(``moekit.dispatch.dispatcher``) then gathers the kept rows, has the expert bank compute them in
one grouped matmul per projection, weights them and sums them back with ``index_add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.dispatch.config import DropPriority


@dataclass
class DispatchPlan:
    """Where each kept assignment goes.

    Attributes:
        token_idx_M: ``(M,)`` source token of each kept assignment, grouped by expert.
        assignment_idx_M: ``(M,)`` flat index ``t * K + j`` of each kept assignment.
        weights_M: ``(M,)`` its combine weight (differentiable).
        kept_per_expert_E: ``(E,)`` rows each expert computes (sums to M).
        routed_per_expert_E: ``(E,)`` assignments the router sent to each expert (before drops).
        num_assignments: A minus padding (the denominator of the dropped fraction).
        capacity: C, or ``None`` when dropless.
        rows_per_expert_E: ``(E,)`` rows each expert computes when that differs from
            ``kept_per_expert_E``: dropless with padding keeps the padding tokens' rows (their
            input zeroed, their weight 0) so M = T*K is known without reading the device.
        padding_T: ``(T,)`` bool, ``True`` for the padding tokens whose rows are kept.
        top_k: K, the assignment slots per token.
    """

    token_idx_M: torch.Tensor
    assignment_idx_M: torch.Tensor
    weights_M: torch.Tensor
    kept_per_expert_E: torch.Tensor
    routed_per_expert_E: torch.Tensor
    num_assignments: int | torch.Tensor
    capacity: int | None
    rows_per_expert_E: torch.Tensor | None = None
    padding_T: torch.Tensor | None = None
    top_k: int = 0  # K (slots per token), 0 when unknown

    @property
    def expert_rows_E(self) -> torch.Tensor:
        """``(E,)`` rows each expert computes, summing to M: the kept assignments, plus (dropless
        with padding) the padding tokens' rows."""
        return self.kept_per_expert_E if self.rows_per_expert_E is None else self.rows_per_expert_E

    @property
    def num_dropped(self) -> int | torch.Tensor:
        return self.num_assignments - self.kept_per_expert_E.sum()


def plan_dispatch(
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    priority: DropPriority = DropPriority.PROBABILITY,
    token_mask_T: torch.Tensor | None = None,
    sequence_length: int | None = None,
    assignment_mask_TK: torch.Tensor | None = None,
    per_sequence: bool = False,
) -> DispatchPlan:
    """Sort assignments by expert, dropping padding and (with ``capacity``) overflow.

    Args:
        expert_idx_TK: ``(T, K)`` chosen experts.
        weights_TK: ``(T, K)`` combine weights.
        num_experts: E.
        capacity: per-expert limit C, or ``None`` for dropless.
        priority: which assignments an over-full expert keeps (see ``DropPriority``).
        token_mask_T: ``(T,)`` bool, ``True`` for real tokens; padding is never dispatched.
        sequence_length: S when the T tokens are B sequences of S (``token`` priority walks
            positions across sequences); ``None`` means one sequence.
        assignment_mask_TK: ``(T, K)`` bool, ``False`` for slots that hold no assignment.
        per_sequence: ``capacity`` applies to each sequence (of ``sequence_length``) on its
            own, ranked in ``priority`` order inside the sequence (Switch Transformer groups).

    Returns:
        A :class:`DispatchPlan`.
    """
    T, K = expert_idx_TK.shape
    device = expert_idx_TK.device
    expert_A = expert_idx_TK.reshape(-1)
    if capacity is None and assignment_mask_TK is None and token_mask_T is not None:
        return _plan_dropless_keeping_padding(expert_idx_TK, weights_TK, num_experts, token_mask_T)
    valid_A = None if assignment_mask_TK is None else assignment_mask_TK.reshape(-1)
    if token_mask_T is not None:
        token_valid_A = token_mask_T.repeat_interleave(K)
        valid_A = token_valid_A if valid_A is None else valid_A & token_valid_A
    if valid_A is not None:
        # Padding and empty slots go to a sentinel bucket E that sorts last and is cut off.
        expert_A = expert_A.masked_fill(~valid_A, num_experts)
    # counts with a fixed shape (bincount's depends on the data), so torch.compile can trace it
    bucket_counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device).index_add_(
        0, expert_A, torch.ones_like(expert_A)
    )
    routed_per_expert_E = bucket_counts[:num_experts]
    # without empty slots every assignment counts: no host sync (variable-k routers and
    # capacity read one count here)
    num_assignments = T * K if valid_A is None else T * K - int(bucket_counts[num_experts])

    if capacity is None:
        order_A = torch.argsort(expert_A, stable=True)
        order_M = order_A if valid_A is None else order_A[:num_assignments]
        kept_per_expert_E = routed_per_expert_E
    else:
        if priority is DropPriority.POSITION:
            # Assignment a = t*K + j; visit all first choices (j=0) in token order, then j=1, ...
            pre_A = torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
        elif priority is DropPriority.TOKEN:
            S = sequence_length or T
            pre_A = torch.arange(T * K, device=device).view(T // S, S, K).transpose(0, 1)
            pre_A = pre_A.reshape(-1)
        else:
            pre_A = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
        if per_sequence:
            order_M, kept_per_expert_E = _keep_per_sequence(
                expert_A, pre_A, num_experts, capacity, sequence_length or T, K
            )
        else:
            order_A = pre_A[torch.argsort(expert_A[pre_A], stable=True)]
            starts_E = torch.cumsum(bucket_counts, 0) - bucket_counts
            sorted_expert_A = expert_A[order_A]
            rank_in_expert_A = torch.arange(T * K, device=device) - starts_E[sorted_expert_A]
            keep_A = (rank_in_expert_A < capacity) & (sorted_expert_A < num_experts)
            order_M = order_A[keep_A]
            kept_per_expert_E = routed_per_expert_E.clamp(max=capacity)

    return DispatchPlan(
        token_idx_M=torch.div(order_M, K, rounding_mode="floor"),
        assignment_idx_M=order_M,
        weights_M=weights_TK.reshape(-1)[order_M],
        kept_per_expert_E=kept_per_expert_E,
        routed_per_expert_E=routed_per_expert_E,
        num_assignments=num_assignments,
        capacity=capacity,
        top_k=K,
    )


def _keep_per_sequence(
    expert_A: torch.Tensor,
    pre_A: torch.Tensor,
    num_experts: int,
    capacity: int,
    sequence_length: int,
    K: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order_M, kept_per_expert_E)`` when each sequence has its own capacity: assignments are
    bucketed by (sequence, expert), ranked in ``pre_A`` order inside each bucket, cut at
    ``capacity``, and the survivors grouped by expert (stably, so by sequence inside one)."""
    A = expert_A.shape[0]
    buckets = num_experts + 1  # the sentinel bucket E holds padding and empty slots
    sequence_A = torch.div(
        torch.arange(A, device=expert_A.device), sequence_length * K, rounding_mode="floor"
    )
    key_A = sequence_A * buckets + expert_A
    order_A = pre_A[torch.argsort(key_A[pre_A], stable=True)]
    sorted_key_A = key_A[order_A]
    counts = torch.zeros(
        (A // (sequence_length * K) + 1) * buckets, dtype=torch.long, device=expert_A.device
    ).index_add_(0, key_A, torch.ones_like(key_A))
    starts = torch.cumsum(counts, 0) - counts
    rank_A = torch.arange(A, device=expert_A.device) - starts[sorted_key_A]
    keep_A = (rank_A < capacity) & (sorted_key_A % buckets < num_experts)
    kept_A = order_A[keep_A]
    kept_expert_A = expert_A[kept_A]
    order_M = kept_A[torch.argsort(kept_expert_A, stable=True)]
    kept_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    kept_per_expert_E.index_add_(0, kept_expert_A, torch.ones_like(kept_expert_A))
    return order_M, kept_per_expert_E


def _plan_dropless_keeping_padding(
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    token_mask_T: torch.Tensor,
) -> DispatchPlan:
    """Dropless dispatch with padding and no host sync: every one of the T*K assignments keeps
    its row (so M is known on the host), padding rows sort with their router's experts, get a
    zeroed input (``Dispatcher.dispatch``) and weight 0, and count in no statistic. Their
    outputs and every gradient through them are exactly zero."""
    K = expert_idx_TK.shape[1]
    expert_A = expert_idx_TK.reshape(-1)
    valid_A = token_mask_T.repeat_interleave(K)
    rows_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    rows_per_expert_E.index_add_(0, expert_A, torch.ones_like(expert_A))
    routed_per_expert_E = torch.zeros_like(rows_per_expert_E).index_add_(
        0, expert_A, valid_A.to(torch.long)
    )
    order_M = torch.argsort(expert_A, stable=True)
    weights_M = weights_TK.reshape(-1)[order_M]
    weights_M = weights_M * valid_A[order_M].to(weights_M.dtype)
    return DispatchPlan(
        token_idx_M=torch.div(order_M, K, rounding_mode="floor"),
        assignment_idx_M=order_M,
        weights_M=weights_M,
        kept_per_expert_E=routed_per_expert_E,
        routed_per_expert_E=routed_per_expert_E,
        num_assignments=valid_A.sum(),
        capacity=None,
        rows_per_expert_E=rows_per_expert_E,
        padding_T=~token_mask_T,
        top_k=K,
    )
