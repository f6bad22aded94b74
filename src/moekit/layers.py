"""The MoE layer: router + dispatcher + expert bank (+ shared experts).

Legend: T = tokens (all leading dims flattened), D = d_model, E = experts, K = experts per
token, M = kept token-expert assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from moekit.analysis.routing_stats import RoutingStats, router_entropy
from moekit.dispatch.config import DispatchConfig
from moekit.dispatch.soft import soft_dispatch_and_combine
from moekit.dispatch.sort import dispatch_and_combine, plan_dispatch
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.losses.collect import collect_moe_outputs
from moekit.losses.config import AuxLossConfig, BalanceScope
from moekit.losses.shazeer import importance_loss, load_loss
from moekit.losses.switch import switch_load_balancing_loss
from moekit.losses.z_loss import router_z_loss
from moekit.routing.config import RouterConfig
from moekit.routing.result import RoutingResult
from moekit.routing.soft import SoftRoutingResult
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class MoEConfig:
    """Everything that builds an :class:`MoE` layer.

    Args:
        d_model: model width D.
        num_experts: routed experts E.
        top_k: experts per token K (1 <= K <= E).
        experts: routed expert shape (hidden width, activation, bias).
        router: router options.
        dispatch: dropless or capacity, capacity factors, drop priority.
        shared_experts: always-on experts, or ``None``.
        aux_loss: auxiliary-loss weights.
        check_finite: raise on NaN/Inf inputs (costs one reduction per call).
    """

    d_model: int
    num_experts: int
    top_k: int
    experts: ExpertConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    shared_experts: SharedExpertConfig | None = None
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    check_finite: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {self.d_model}")
        self.router.validate_for(self.num_experts, self.top_k)
        if self.aux_loss.load > 0 and not self.router.noisy_gating:
            raise ValueError("aux_loss.load > 0 needs router.noisy_gating=True (Shazeer et al.)")
        if self.aux_loss.load > 0 and self.top_k >= self.num_experts:
            raise ValueError(
                f"aux_loss.load > 0 needs top_k < num_experts (the load estimator compares each "
                f"logit with the k-th and (k+1)-th), got top_k={self.top_k}, "
                f"num_experts={self.num_experts}"
            )

    def build(self) -> MoE:
        return MoE(
            d_model=self.d_model,
            router=self.router.build(self.d_model, self.num_experts, self.top_k),
            experts=self.experts.build(self.num_experts, self.d_model),
            dispatch=self.dispatch,
            shared_experts=(
                None if self.shared_experts is None else self.shared_experts.build(self.d_model)
            ),
            aux_loss=self.aux_loss,
            check_finite=self.check_finite,
        )


@dataclass
class MoEOutput:
    """What one MoE call returns.

    Attributes:
        output: same shape as the input.
        aux_loss: scalar, the weighted sum of ``losses`` (add it to the task loss).
        losses: unweighted auxiliary losses by name (``switch``, ``z_loss``, ``importance``,
            ``load``), only those with a non-zero weight.
        stats: routing statistics of the call.
        routing: the router's raw decision (indices, weights, logits, probabilities), or a
            ``SoftRoutingResult`` for Soft MoE.
        inner_outputs: outputs of MoE layers serving as experts (hierarchical MoE); their
            auxiliary losses are already included in ``aux_loss``.
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: RoutingStats
    routing: RoutingResult | SoftRoutingResult
    inner_outputs: list[MoEOutput] = field(default_factory=list)


class MoE(nn.Module):
    """Mixture-of-Experts layer ``(..., D) -> MoEOutput`` whose ``output`` is ``(..., D)``.

    Forward steps:
        1. score and select: the router gives each token K experts and combine weights;
        2. plan: sort assignments by expert; drop padding and, in capacity mode, overflow;
        3. dispatch and expert compute: gather rows, one grouped matmul per projection;
        4. combine: weight each row and sum it into its token (dropped rows add zero, so the
           caller's residual carries a dropped token unchanged);
        5. add the shared experts;
        6. auxiliary losses and routing statistics.

    Built by composition: any router returning :class:`RoutingResult` and any expert bank with
    ``bank(x_MD, counts_E)`` (``ExpertBank``, ``ModuleExperts``) fit.
    """

    def __init__(
        self,
        *,
        d_model: int,
        router: nn.Module,
        experts: nn.Module,
        dispatch: DispatchConfig | None = None,
        shared_experts: nn.Module | None = None,
        aux_loss: AuxLossConfig | None = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        router_experts, bank_experts = (
            router.num_experts,
            experts.num_experts,
        )
        if router_experts != bank_experts:
            raise ValueError(
                f"router has {router_experts} experts but the expert bank has {bank_experts}"
            )
        self.d_model = d_model
        self.num_experts: int = int(cast(Any, router).num_experts)
        # expert slots per token (E for dense and expert choice)
        self.top_k: int = int(cast(Any, router).top_k)
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.dispatch = dispatch or DispatchConfig()
        self.aux_loss = aux_loss or AuxLossConfig()
        self.check_finite = check_finite
        # set by moekit.distributed.parallelize_experts: statistics, the Switch loss's load and
        # the bias-balancing tally are summed over this group
        self.process_group: Any = None

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> MoEOutput:
        """Args:
        x: ``(..., D)`` floating-point input.
        padding_mask: ``x.shape[:-1]`` bool, ``True`` for real tokens. Padding is not
            dispatched (its routed output is zero), uses no capacity and is left out of the
            losses and statistics.
        token_ids: ``x.shape[:-1]`` integer token ids, for routers that route by id (hash).
        """
        self._check_input(x, padding_mask, token_ids)
        if getattr(self.router, "soft", False):
            return self._soft_forward(x, padding_mask)
        x_TD = x.reshape(-1, self.d_model)
        mask_T = None if padding_mask is None else padding_mask.reshape(-1)
        num_tokens = x_TD.shape[0] if mask_T is None else int(mask_T.sum())
        sequence_length = x.shape[-2] if x.dim() >= 3 else None

        routing = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1), mask_T)
        capacity = self.dispatch.capacity(
            num_tokens, routing.top_k, self.num_experts, self.training
        )
        if self.process_group is not None and capacity is not None:
            plan = self._plan_with_global_capacity(routing, mask_T, sequence_length)
            capacity = plan.capacity
        else:
            plan = plan_dispatch(
                routing.expert_idx_TK,
                routing.weights_TK,
                self.num_experts,
                capacity=capacity,
                priority=self.dispatch.drop_priority,
                token_mask_T=mask_T,
                sequence_length=sequence_length,
                assignment_mask_TK=routing.assignment_mask_TK,
            )
        with collect_moe_outputs(self.experts) as inner:  # hierarchical MoE: inner levels
            y_TD = dispatch_and_combine(x_TD, plan, self.experts)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)

        losses = self._aux_losses(routing, mask_T, sequence_length)
        weights = self.aux_loss.weights()
        aux_loss = sum(
            (weights[name] * value for name, value in losses.items()),
            start=routing.weights_TK.new_zeros(()),
        )
        inner_outputs = [out for calls in inner.outputs.values() for out in calls]
        for out in inner_outputs:
            aux_loss = aux_loss + out.aux_loss
        routed_E, kept_E = plan.routed_per_expert_E.detach(), plan.kept_per_expert_E.detach()
        if self.process_group is not None:
            routed_E, kept_E = self._sum_across_ranks(routed_E), self._sum_across_ranks(kept_E)
        routed_T = torch.zeros(x_TD.shape[0], device=x.device).index_add_(
            0, plan.token_idx_M, torch.ones_like(plan.token_idx_M, dtype=torch.float32)
        )
        real = max(num_tokens, 1)
        unrouted_T = (routed_T == 0) if mask_T is None else (routed_T == 0) & mask_T
        scalar = routed_T.new_tensor  # statistics live on the input's device
        stats = RoutingStats(
            tokens_per_expert=routed_E,
            kept_per_expert=kept_E,
            dropped_fraction=scalar(plan.num_dropped / max(plan.num_assignments, 1)),
            router_entropy=router_entropy(routing.probs_TE, mask_T),
            capacity=capacity,
            experts_per_token=scalar(plan.token_idx_M.shape[0] / real),
            unrouted_fraction=unrouted_T.sum().float() / real,
        )
        record_load = getattr(self.router, "record_load", None)
        if self.training and record_load is not None:
            record_load(routed_E)  # global under parallelism: same bias everywhere
        return MoEOutput(
            output=y_TD.view(x.shape),
            aux_loss=aux_loss,
            losses=losses,
            stats=stats,
            routing=routing,
            inner_outputs=inner_outputs,
        )

    def _soft_forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> MoEOutput:
        """Soft MoE (steps 1-4 become: slot weights, slot mixing, experts, token mixing)."""
        S = x.shape[-2] if x.dim() >= 2 else 1
        x_BSD = x.reshape(-1, S, self.d_model)
        mask_BS = None if padding_mask is None else padding_mask.reshape(-1, S)
        routing = self.router(x_BSD, mask_BS)
        y_BSD = soft_dispatch_and_combine(x_BSD, routing, self.experts, self.num_experts)
        if mask_BS is not None:
            y_BSD = y_BSD * mask_BS.unsqueeze(-1).to(y_BSD.dtype)
        if self.shared_experts is not None:
            y_BSD = y_BSD + self.shared_experts(x_BSD).to(y_BSD.dtype)
        B = x_BSD.shape[0]
        slots = torch.full((self.num_experts,), B * routing.slots_per_expert, device=x.device)
        combine_TN = routing.combine_BSN.reshape(-1, routing.combine_BSN.shape[-1])
        mask_T = None if mask_BS is None else mask_BS.reshape(-1)
        stats = RoutingStats(
            tokens_per_expert=slots,
            kept_per_expert=slots,
            dropped_fraction=x.new_zeros((), dtype=torch.float32),
            router_entropy=router_entropy(combine_TN, mask_T),
            # expert evaluations per token: every slot is one expert call
            experts_per_token=x.new_tensor(
                self.num_experts * routing.slots_per_expert / x_BSD.shape[1], dtype=torch.float32
            ),
            unrouted_fraction=x.new_zeros((), dtype=torch.float32),
        )
        return MoEOutput(
            output=y_BSD.reshape(x.shape),
            aux_loss=x.new_zeros((), dtype=torch.float32),
            losses={},
            stats=stats,
            routing=routing,
        )

    def _aux_losses(
        self,
        routing: RoutingResult,
        mask_T: torch.Tensor | None,
        sequence_length: int | None,
    ) -> dict[str, torch.Tensor]:
        weights = self.aux_loss.weights()
        losses: dict[str, torch.Tensor] = {}
        if "switch" in weights:
            per_sequence = self.aux_loss.switch_scope is BalanceScope.SEQUENCE
            losses["switch"] = switch_load_balancing_loss(
                routing.probs_TE,
                routing.expert_idx_TK,
                token_mask_T=mask_T,
                sequence_length=sequence_length if per_sequence else None,
                assignment_mask_TK=routing.assignment_mask_TK,
                sum_across_ranks=None if per_sequence else self._sum_across_ranks,
            )
        if "z_loss" in weights:
            losses["z_loss"] = router_z_loss(routing.logits_TE, token_mask_T=mask_T)
        if "importance" in weights:
            gates_TK = routing.weights_TK
            if routing.assignment_mask_TK is not None:
                gates_TK = gates_TK * routing.assignment_mask_TK
            losses["importance"] = importance_loss(
                gates_TK, routing.expert_idx_TK, self.num_experts, token_mask_T=mask_T
            )
        if (
            "load" in weights
            and routing.noise_std_TE is not None
            and routing.clean_logits_TE is not None
        ):
            losses["load"] = load_loss(
                routing.clean_logits_TE,
                routing.logits_TE,
                routing.noise_std_TE,
                self.top_k,
                token_mask_T=mask_T,
            )
        return losses

    def _plan_with_global_capacity(self, routing, mask_T, sequence_length):
        """Capacity under data/expert parallelism: drop exactly what one process would."""
        from moekit.dispatch.global_capacity import global_capacity_keep_mask

        capacity, keep_TK = global_capacity_keep_mask(
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            self.dispatch,
            self.training,
            token_mask_T=mask_T,
            assignment_mask_TK=routing.assignment_mask_TK,
            sequence_length=sequence_length,
            group=self.process_group,
        )
        routed = plan_dispatch(  # the demand before drops, for statistics
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            token_mask_T=mask_T,
            assignment_mask_TK=routing.assignment_mask_TK,
        )
        plan = plan_dispatch(
            routing.expert_idx_TK,
            routing.weights_TK,
            self.num_experts,
            token_mask_T=mask_T,
            assignment_mask_TK=keep_TK,
        )
        plan.routed_per_expert_E = routed.routed_per_expert_E
        plan.num_assignments = routed.num_assignments
        plan.capacity = capacity
        return plan

    def _sum_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.process_group is None:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, group=self.process_group)
        return value

    def _check_input(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, token_ids: torch.Tensor | None
    ) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (..., d_model={self.d_model}), got {tuple(x.shape)}"
            )
        if padding_mask is not None:
            if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
                raise TypeError(
                    "padding_mask must be a bool tensor (True = real token), got "
                    f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)}"
                )
            if padding_mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"padding_mask must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                    f"got {tuple(padding_mask.shape)}"
                )
        if token_ids is not None and (
            token_ids.shape != x.shape[:-1] or token_ids.is_floating_point()
        ):
            raise ValueError(
                f"token_ids must be an integer tensor of shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                f"got {tuple(token_ids.shape)} {token_ids.dtype}"
            )
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf values (check_finite=True)")
