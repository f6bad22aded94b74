"""The dispatcher: plans where token-expert assignments go, moves rows to the expert bank and
back, and says over which processes load is counted.

Legend: T = tokens, D = d_model, E = experts, K = expert slots per token, M = kept assignments.

:class:`Dispatcher` is the single-process one (one stable argsort, gather, grouped GEMM,
weighted ``index_add``; see ``moekit.dispatch.sort``). Expert parallelism does not change the
layer or the expert bank: ``moekit.distributed`` swaps in a dispatcher whose plan counts
capacity over every rank and whose ``run`` sends rows to the rank that holds their expert. Every
collective lives there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moekit.dispatch.config import CapacityScope, DispatchMode, DropPriority
from moekit.dispatch.sort import DispatchPlan, plan_dispatch
from moekit.experts.backends import fused_experts
from moekit.routing.result import RoutingResult
from moekit.utils.capacity import capacity_formula
from moekit.utils.precision import autocast_off
from moekit.utils.randomness import expert_row_keys, rows_named
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class DispatchConfig:
    """How tokens reach experts.

    Args:
        mode: ``dropless`` or ``capacity``.
        capacity_factor: training capacity factor ``c`` in ``C = ceil(c * T * K / E)``.
        eval_capacity_factor: the same in eval mode.
        min_capacity: lower bound on ``C``.
        drop_priority: ``probability``, ``position`` or ``token`` (see ``DropPriority``).
        expert_capacity: a fixed ``C`` (0: from the capacity factor); Switch Transformer
            checkpoints name theirs ``expert_capacity``.
        capacity_scope: ``batch`` (one ``C`` per expert for the call) or ``sequence`` (one per
            expert per sequence, where ``T`` in the formula is the sequence length).
        weight_input: apply each assignment's router weight to the expert's *input* instead of
            its output (``expert(w * x)``, Llama 4); the outputs are then summed unweighted.
    """

    mode: DispatchMode = DispatchMode.DROPLESS
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_priority: DropPriority = DropPriority.PROBABILITY
    expert_capacity: int = 0
    capacity_scope: CapacityScope = CapacityScope.BATCH
    weight_input: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if self.expert_capacity < 0:
            raise ValueError(
                f"expert_capacity must be >= 0 (0: from the factor), got {self.expert_capacity}"
            )

    def capacity(self, num_tokens: int, top_k: int, num_experts: int, training: bool) -> int | None:
        """``C = max(min_capacity, ceil(factor * T * K / E))`` (``expert_capacity`` when set),
        or ``None`` when dropless; per sequence, ``T`` is the sequence length. Above ``T * K``
        it drops nothing but is still reported as the formula gives it (up to
        ``moekit.utils.capacity.CAPACITY_LIMIT``, so a huge factor cannot overflow)."""
        if self.mode is DispatchMode.DROPLESS:
            return None
        if self.expert_capacity:
            return self.expert_capacity
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return max(self.min_capacity, capacity_formula(factor, num_tokens * top_k, num_experts))

    def build(self, *, num_experts: int) -> Dispatcher:
        """The single-process dispatcher of this config for a layer of E experts."""
        return Dispatcher(self, num_experts=num_experts)


class Dispatcher:
    """Sort-and-group dispatch on one process.

    Args:
        config: dropless or capacity, capacity factors, drop priority.
        num_experts: E.
    """

    def __init__(self, config: DispatchConfig, *, num_experts: int) -> None:
        self.config = config
        self.num_experts = num_experts

    def plan(
        self,
        routing: RoutingResult,
        token_mask_T: torch.Tensor | None,
        sequence_length: int | None,
        training: bool,
    ) -> DispatchPlan:
        """Sort the assignments by expert; drop padding, empty slots and (capacity) overflow."""
        return plan_dispatch(
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            capacity=self.capacity(routing, token_mask_T, training, sequence_length),
            priority=self.config.drop_priority,
            token_mask_T=token_mask_T,
            sequence_length=sequence_length,
            assignment_mask_TK=routing.assignment_mask_TK,
            per_sequence=self.config.capacity_scope is CapacityScope.SEQUENCE,
        )

    def capacity(
        self,
        routing: RoutingResult,
        token_mask_T: torch.Tensor | None,
        training: bool,
        sequence_length: int | None = None,
    ) -> int | None:
        """Per-expert capacity C from this call's real tokens (per sequence: from its length),
        or ``None`` when dropless."""
        if self.config.mode is DispatchMode.DROPLESS or self.config.expert_capacity:
            return self.config.capacity(0, routing.top_k, self.num_experts, training)
        T = routing.expert_idx_TK.shape[0]
        if self.config.capacity_scope is CapacityScope.SEQUENCE:
            S = sequence_length or T
            return self.config.capacity(S, routing.top_k, self.num_experts, training)
        real = T if token_mask_T is None else int(token_mask_T.sum())
        return self.config.capacity(real, routing.top_k, self.num_experts, training)

    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, experts) -> torch.Tensor:
        """Gather kept rows, run them through ``experts(x_MD, counts_E)``, weight, sum per token.

        Args:
            x_TD: ``(T, D)`` token inputs.
            plan: from :meth:`plan`.
            experts: an expert bank (``ExpertBank``, ``ModuleExperts`` or anything with that
                call).

        Returns:
            ``(T, D)``; a token whose assignments were all dropped (or padding) gets zeros, so
            the caller's residual carries it unchanged.
        """
        if type(self).compute is Dispatcher.compute:  # the experts are local
            masked = x_TD
            if plan.padding_T is not None:
                masked = x_TD.masked_fill(plan.padding_T.unsqueeze(-1), 0.0)
            fused = fused_experts(experts, masked, plan, weight_input=self.config.weight_input)
            if fused is not None:  # the Triton kernels: gather to combine in two launches
                return fused
        x_MD = self.dispatch(x_TD, plan)
        if self.config.weight_input:  # expert(w * x), summed unweighted (Llama 4)
            x_MD = x_MD * plan.weights_M.unsqueeze(-1).to(x_MD.dtype)
            plan = dataclasses.replace(plan, weights_M=torch.ones_like(plan.weights_M))
        row_names_M = None
        if getattr(experts, "dropout", 0.0) and experts.training:  # keyed expert dropout
            row_names_M = expert_row_keys(plan.token_idx_M, plan.expert_rows_E, x_TD.shape[0])
        y_MD = self.compute(x_MD, plan, experts, row_names_M)
        return combine(x_TD, y_MD, plan)

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``(M, D)``: each kept row's token input, grouped by expert (padding rows zeroed)."""
        if plan.padding_T is not None:
            x_TD = x_TD.masked_fill(plan.padding_T.unsqueeze(-1), 0.0)
        return gather_rows(x_TD, plan)

    def compute(
        self,
        x_MD: torch.Tensor,
        plan: DispatchPlan,
        experts,
        row_names_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(M, D)``: the rows through their experts. Here the experts are all local; a
        parallel dispatcher overrides this step with its exchange. ``row_names_M`` (int64, one
        per row: token position × E + expert) keys the experts' dropout when given."""
        return run_experts(experts, x_MD, plan.expert_rows_E, row_names_M)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes that share this layer's load (here: itself)."""
        return value

    def differentiable_global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed like :meth:`global_sum`, keeping its gradient (here: itself)."""
        return value


def run_experts(
    experts, x_MD: torch.Tensor, counts_E: torch.Tensor, row_names_M: torch.Tensor | None
) -> torch.Tensor:
    """``experts(x_MD, counts_E)``, with the rows' names (``row_names_M``: token position × E +
    expert) keying the experts' dropout when given."""
    if row_names_M is None:  # no context to enter (torch.compile cannot trace a ContextVar)
        return experts(x_MD, counts_E)
    with rows_named(row_names_M):
        return experts(x_MD, counts_E)


# How ``combine`` sums each token's rows: "bmm" (rows placed in (T, K, D) slot order, then one
# batched (1 x K) @ (K x D) product per token: fp32 accumulation inside the GEMM, deterministic,
# no atomics), "sum" (weighted rows in slot order, then a reduction over K in fp32) or
# "index_add" (weighted rows upcast to fp32 and added into an fp32 (T, D) buffer). "auto":
# "bmm" when the rows have the stream's dtype, "sum" when bf16 rows meet an fp32 stream
# (autocast), "index_add" on the CPU. Measured on an H200 (bench_gpu.py --sections profile),
# layer fwd+bwd at the Qwen3-30B-A3B shape in bf16: bmm 25.9 / sum 30.9 / index_add 32.5 ms;
# at the LM step's shape (T=16384, D=2048, E=16, k=4) under autocast: 13.7 / 12.8 / 13.1 ms.
# On the CPU (fp32, 2 threads, T=16384, top-2): 2479 / 2274 / 2232 ms at 64 experts.
COMBINE = "auto"


def combine(x_TD: torch.Tensor, y_MD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``(T, D)`` in ``x_TD``'s dtype: each token's expert outputs times their combine weights,
    summed, with fp32 accumulation whatever the experts' dtype (a bf16 accumulator rounds once
    per added row, and CUDA's ``index_add_`` adds with atomics)."""
    T, D = x_TD.shape
    K = plan.top_k
    mode = COMBINE
    if mode == "auto" and x_TD.device.type == "cpu":
        mode = "index_add"  # measured on the CPU: 0.90x bmm's time at 16384 tokens, top-2
    elif mode == "auto":
        mode = "bmm" if y_MD.dtype == x_TD.dtype else "sum"
    if mode == "bmm" and K > 0 and T > 0:
        return _combine_bmm(x_TD, y_MD, plan, T, K, D)
    if mode == "sum" and K > 0 and T > 0:
        return _combine_sum(x_TD, y_MD, plan, T, K, D)
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    weighted_MD = y_MD.to(acc_dtype) * plan.weights_M.unsqueeze(-1).to(acc_dtype)
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=acc_dtype)
    return out_TD.index_add_(0, plan.token_idx_M, weighted_MD).to(x_TD.dtype)


def _combine_bmm(
    x_TD: torch.Tensor, y_MD: torch.Tensor, plan: DispatchPlan, T: int, K: int, D: int
) -> torch.Tensor:
    """Rows back in slot order ``t * K + j`` (dropped slots zero), then ``w_T1K @ y_TKD``.

    The product runs in the rows' dtype, accumulating in fp32 (one rounding per output, the
    weights rounded once to that dtype); it reads each row once and writes T rows, where
    upcasting, weighting and ``index_add`` in fp32 move about three times the bytes."""
    # the product in the rows' dtype: bf16 GEMMs accumulate in fp32 and round once at the end
    # (an fp32 product of bf16 rows under autocast measured 1.8 ms per layer on an H200, as
    # much as the expert GEMMs' tenth)
    dtype = y_MD.dtype
    A = T * K
    full = y_MD.shape[0] == A  # every slot has a row (dropless): nothing to zero-fill
    y_AD = y_MD.new_empty(A, D, dtype=dtype) if full else y_MD.new_zeros(A, D, dtype=dtype)
    y_AD = y_AD.index_copy(0, plan.assignment_idx_M, y_MD.to(dtype))
    w_A = plan.weights_M.new_zeros(A).index_copy(0, plan.assignment_idx_M, plan.weights_M)
    with autocast_off(x_TD.device):
        out_T1D = torch.bmm(w_A.view(T, 1, K).to(dtype), y_AD.view(T, K, D))
    return out_T1D.view(T, D).to(x_TD.dtype)


def _combine_sum(
    x_TD: torch.Tensor, y_MD: torch.Tensor, plan: DispatchPlan, T: int, K: int, D: int
) -> torch.Tensor:
    """Rows back in slot order, then ``(y_TKD * w_TK1).sum(1)`` with fp32 products and sums:
    elementwise work and a reduction instead of a batched GEMM with an inner width of K."""
    A = T * K
    full = y_MD.shape[0] == A
    y_AD = y_MD.new_empty(A, D) if full else y_MD.new_zeros(A, D)
    y_AD = y_AD.index_copy(0, plan.assignment_idx_M, y_MD)
    w_A = plan.weights_M.new_zeros(A).index_copy(0, plan.assignment_idx_M, plan.weights_M)
    acc = torch.promote_types(y_MD.dtype, torch.float32)
    y_TKD = y_AD.view(T, K, D).to(acc)
    return (y_TKD * w_A.view(T, K, 1).to(acc)).sum(dim=1).to(x_TD.dtype)


def gather_rows(
    x_TD: torch.Tensor, plan: DispatchPlan, *, slot_sum: bool | None = None
) -> torch.Tensor:
    """``x_TD[plan.token_idx_M]`` ``(M, D)``.

    With ``slot_sum`` (default: on accelerators) the backward sums each token's K row
    gradients in slot order (``(T, K, D).sum(1)``: deterministic, fp32 accumulation) instead
    of ``index_select``'s ``index_add`` (atomics on CUDA, one rounding per add in bf16: 4.5 ms
    of a 27 ms layer step on an H200 at the Qwen3-30B-A3B shape). On the CPU ``index_add``
    accumulates bf16 exactly enough and measured as fast (0.98-1.08x), so it stays.
    """
    if slot_sum is None:
        slot_sum = x_TD.device.type != "cpu"
    if not slot_sum or plan.top_k <= 0 or not torch.is_grad_enabled() or not x_TD.requires_grad:
        return x_TD.index_select(0, plan.token_idx_M)
    return _GatherRows.apply(x_TD, plan.token_idx_M, plan.assignment_idx_M, plan.top_k)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_idx_M, assignment_idx_M, K):  # type: ignore[override]
        ctx.save_for_backward(assignment_idx_M)
        ctx.T, ctx.K = x_TD.shape[0], K
        return x_TD.index_select(0, token_idx_M)

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        (assignment_idx_M,) = ctx.saved_tensors
        T, K = ctx.T, ctx.K
        D = grad_MD.shape[1]
        A = T * K
        full = grad_MD.shape[0] == A
        grad_AD = grad_MD.new_empty(A, D) if full else grad_MD.new_zeros(A, D)
        grad_AD.index_copy_(0, assignment_idx_M, grad_MD)
        grad_TD = grad_AD.view(T, K, D).sum(dim=1, dtype=torch.float32).to(grad_MD.dtype)
        return grad_TD, None, None, None
