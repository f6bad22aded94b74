"""Expert parallelism (EP) as a dispatcher: experts split over ranks, rows travel to their
expert's rank with ``all_to_all_single`` and come back the same way.

Legend: R = ranks in the EP group, E = experts, L = E / R local experts per rank, T = tokens on
this rank, M = kept rows on this rank sorted by (global) expert, D = d_model.

Applied from outside the model (``parallelize_experts``): each ``MoE`` keeps its router, losses
and layer code; its expert bank stays an ``ExpertBank`` holding this rank's ``L`` experts, and
its dispatcher becomes an :class:`ExpertParallelDispatcher`. Rank ``r`` owns experts
``r*L .. r*L+L-1``. Every rank always joins both exchanges, so a rank (or an expert) that
receives no tokens never hangs the others. Every collective of expert parallelism lives in this
package.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce

from moekit.dispatch.config import CapacityScope, DispatchMode
from moekit.dispatch.dispatcher import DispatchConfig, Dispatcher, run_experts
from moekit.dispatch.sort import DispatchPlan, plan_dispatch
from moekit.distributed.global_capacity import global_capacity_keep_mask
from moekit.routing.result import RoutingResult


@dataclass
class TrafficMeter:
    """What the row exchanges of expert parallelism cost on this rank (see :func:`meter_traffic`).

    Attributes:
        exchanges: uneven all-to-alls of rows (4 per MoE layer and training step: dispatch and
            combine, forward and backward).
        bytes_sent: row bytes this rank sent to other ranks (rows for its own experts stay).
        bytes_received: row bytes it received from other ranks.
        seconds: wall time inside those all-to-alls (transfer plus waiting for slower ranks).
    """

    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


_meter: TrafficMeter | None = None


@contextmanager
def meter_traffic() -> Iterator[TrafficMeter]:
    """Count the bytes and time of every row exchange on this rank inside the block."""
    global _meter
    outer, _meter = _meter, TrafficMeter()
    try:
        yield _meter
    finally:
        _meter = outer


def _all_to_all_rows(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group
) -> torch.Tensor:
    """Uneven all-to-all of rows: ``in_splits[r]`` rows go to rank r, ``out_splits[r]`` come
    from it (metered when :func:`meter_traffic` is on)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    metered_cuda = _meter is not None and x.is_cuda
    if metered_cuda:  # the collective is asynchronous on CUDA: time it with events
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if _meter is not None:
        rank = dist.get_rank(group)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        _meter.exchanges += 1
        _meter.bytes_sent += (sum(in_splits) - in_splits[rank]) * row_bytes
        _meter.bytes_received += (sum(out_splits) - out_splits[rank]) * row_bytes
        if metered_cuda:
            end.record()
            end.synchronize()  # metering is opt-in: its sync is the price of a true time
            _meter.seconds += begin.elapsed_time(end) / 1e3
        else:
            _meter.seconds += time.perf_counter() - start
    return out


class _ExchangeRows(torch.autograd.Function):
    """Differentiable row exchange: the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _all_to_all_rows(grad_out, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows (backward sends gradients back)."""
    return _ExchangeRows.apply(x, out_splits, in_splits, group)


class ExpertParallelDispatcher(Dispatcher):
    """Dispatch over an expert-parallel group; the layer's expert bank holds the local experts.

    ``plan``: capacity decisions are those one process with the global batch would make.
    ``run``: rows go to their expert's rank, through the local bank, and back.
    ``global_sum``: an all-reduce over the group (expert counts for the Switch loss, statistics
    and the bias-balancing tally).

    Args:
        config, num_experts: as for ``Dispatcher``.
        group: the expert-parallel group the experts are split over (default: every rank); of
            size 1, rows stay on this rank (data parallelism only).
        count_group: the ranks whose tokens make up the global batch (expert counts and
            capacity are decided over them); default ``group``. On a data × expert mesh it is
            every data-parallel rank, a superset of ``group``.
    """

    def __init__(
        self, config: DispatchConfig, *, num_experts: int, group=None, count_group=None
    ) -> None:
        super().__init__(config, num_experts=num_experts)
        self.group = group if group is not None else dist.group.WORLD
        self.count_group = count_group if count_group is not None else self.group
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_experts % self.world:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the expert-parallel degree "
                f"{self.world}"
            )
        self.local_experts = num_experts // self.world
        self.first_expert = self.rank * self.local_experts

    def plan(
        self,
        routing: RoutingResult,
        token_mask_T: torch.Tensor | None,
        sequence_length: int | None,
        training: bool,
    ) -> DispatchPlan:
        if (
            self.config.mode is DispatchMode.DROPLESS
            or self.config.capacity_scope is CapacityScope.SEQUENCE
        ):  # per-sequence capacity is decided where the sequence is: no exchange needed
            return super().plan(routing, token_mask_T, sequence_length, training)
        capacity, keep_TK = global_capacity_keep_mask(
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            self.config,
            training,
            token_mask_T=token_mask_T,
            assignment_mask_TK=routing.assignment_mask_TK,
            sequence_length=sequence_length,
            group=self.count_group,
        )
        demand = plan_dispatch(  # before drops, for the statistics
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            token_mask_T=token_mask_T,
            assignment_mask_TK=routing.assignment_mask_TK,
        )
        plan = plan_dispatch(
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            token_mask_T=token_mask_T,
            assignment_mask_TK=keep_TK,
        )
        plan.routed_per_expert_E = demand.routed_per_expert_E
        plan.num_assignments = demand.num_assignments
        plan.capacity = capacity
        return plan

    def compute(
        self,
        x_MD: torch.Tensor,
        plan: DispatchPlan,
        experts,
        row_names_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The exchange: rows to their expert's rank, through the local bank, and back (the
        rows' names, when given, travel with them and key the experts' dropout)."""
        if self.world == 1:  # every expert is here (data parallelism only)
            return run_experts(experts, x_MD, plan.expert_rows_E, row_names_M)
        return self._through_local_experts(x_MD, plan.expert_rows_E, experts, row_names_M)

    def _through_local_experts(
        self,
        x_MD: torch.Tensor,
        counts_E: torch.Tensor,
        experts,
        row_names_M: torch.Tensor | None = None,
    ):
        R, L = self.world, self.local_experts
        # 1. how many rows go to each rank, and (exchanged first) how many arrive per expert
        send_counts_RL = counts_E.view(R, L).to(torch.long)
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=self.group)
        # the split sizes must be Python ints: one host read for both
        in_splits, out_splits = torch.stack([send_counts_RL.sum(1), recv_counts_RL.sum(1)]).tolist()
        # 2. rows travel to the rank that owns their expert
        recv_MD = _exchange(x_MD, out_splits, in_splits, self.group)
        # 3. received rows are grouped by source rank, then expert: regroup by local expert
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_MD.device).repeat(R),
            recv_counts_RL.reshape(-1),
            output_size=recv_MD.shape[0],
        )
        order = torch.argsort(local_expert_of_row, stable=True)
        recv_names = None
        if row_names_M is not None:
            recv_names = row_names_M.new_empty(recv_MD.shape[0])
            dist.all_to_all_single(recv_names, row_names_M, out_splits, in_splits, group=self.group)
            recv_names = recv_names[order]
        y_sorted = run_experts(experts, recv_MD[order], recv_counts_RL.sum(dim=0), recv_names)
        y_MD = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        # 4. results travel back to the rows' home ranks, in their original order
        return _exchange(y_MD, in_splits, out_splits, self.group)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, group=self.count_group)
        return value

    def differentiable_global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """An autograd all-reduce: every rank's loss on the global sum sends its gradient
        back to every rank's part (averaged with the other gradients, that is the gradient of
        the global loss)."""

        return all_reduce(value, group=self.count_group)
