"""Expert parallelism (EP) with ``torch.distributed``: experts split over ranks, tokens travel to
their expert's rank with ``all_to_all_single`` and come back the same way.

Legend: R = ranks in the EP group, E = experts, L = E / R local experts per rank, M = rows sorted
by (global) expert on this rank, D = d_model.

Applied from outside the model (``parallelize_experts``): each ``MoE`` keeps its router,
dispatcher and losses; only its expert bank is swapped for an :class:`ExpertParallelBank` that
holds the ``L`` experts of this rank and exchanges rows. Rank ``r`` owns experts
``r*L .. r*L+L-1``. Every rank always joins both exchanges, so a rank (or an expert) that
receives no tokens never hangs the others.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from moekit.experts.bank import ExpertBank
from moekit.experts.fused_ffn import expert_ffn


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows (backward sends gradients back)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    # the deprecation notice points to a private module; keep the public differentiable op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


class ExpertParallelBank(nn.Module):
    """The local slice of an ``ExpertBank``; ``(M, D), counts_E -> (M, D)`` like the full bank.

    Parameters have the full bank's names with ``L`` rows: ``w_in_EDH`` ``(L, D, H)``, etc.
    """

    def __init__(self, bank: ExpertBank, group=None) -> None:
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if bank.num_experts % self.world:
            raise ValueError(
                f"num_experts={bank.num_experts} must be divisible by the expert-parallel "
                f"degree {self.world}"
            )
        self.num_experts = bank.num_experts
        self.local_experts = bank.num_experts // self.world
        self.first_expert = self.rank * self.local_experts
        self.d_model, self.hidden = bank.d_model, bank.hidden
        self.activation, self.kernel = bank.activation, bank.kernel
        local = slice(self.first_expert, self.first_expert + self.local_experts)
        self.w_in_EDH = nn.Parameter(bank.w_in_EDH.detach()[local].clone())
        self.w_out_EHD = nn.Parameter(bank.w_out_EHD.detach()[local].clone())
        self.b_in_EH = (
            None if bank.b_in_EH is None else nn.Parameter(bank.b_in_EH.detach()[local].clone())
        )
        self.b_out_ED = (
            None if bank.b_out_ED is None else nn.Parameter(bank.b_out_ED.detach()[local].clone())
        )

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        R, L = self.world, self.local_experts
        # 1. how many rows go to each rank, and (exchanged first) how many arrive per expert
        send_counts_RL = counts_E.view(R, L).to(torch.long)
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=self.group)
        in_splits = send_counts_RL.sum(dim=1).tolist()
        out_splits = recv_counts_RL.sum(dim=1).tolist()
        # 2. rows travel to the rank that owns their expert
        recv_MD = _exchange(x_MD, out_splits, in_splits, self.group)
        # 3. received rows are grouped by source rank, then expert: regroup by local expert
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_MD.device).repeat(R),
            recv_counts_RL.reshape(-1),
            output_size=recv_MD.shape[0],
        )
        order = torch.argsort(local_expert_of_row, stable=True)
        y_sorted = expert_ffn(
            recv_MD[order],
            recv_counts_RL.sum(dim=0),
            self.w_in_EDH,
            self.w_out_EHD,
            b_in_EH=self.b_in_EH,
            b_out_ED=self.b_out_ED,
            activation=self.activation,
            kernel=self.kernel,
        )
        y_MD = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        # 4. results travel back to the rows' home ranks, in their original order
        return _exchange(y_MD, in_splits, out_splits, self.group)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.local_experts - 1} of "
            f"{self.num_experts} (rank {self.rank}/{self.world})"
        )
