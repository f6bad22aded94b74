"""The MoE layer: router + dispatcher + expert bank (+ shared experts).

Legend: T = tokens (all leading dims flattened), D = d_model, E = experts, K = experts per
token, M = kept token-expert assignments.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from moekit.dispatch.config import DispatchMode
from moekit.dispatch.direct import direct_applies, direct_experts
from moekit.dispatch.dispatcher import DispatchConfig, Dispatcher
from moekit.dispatch.soft import causal_soft_dispatch_and_combine, soft_dispatch_and_combine
from moekit.dispatch.sort import DispatchPlan
from moekit.experts.bank import ExpertConfig
from moekit.experts.shared import SharedExpertConfig
from moekit.experts.zero_computation import ZeroComputationConfig
from moekit.layers.statistics import RoutingStats, routing_stats, soft_routing_stats
from moekit.losses.auxiliary import auxiliary_losses, weighted_sum
from moekit.losses.config import AuxLossConfig
from moekit.losses.global_batch import BalanceTally, GlobalBalance
from moekit.routing import RouterKind, RouterOptions, TopKRouterConfig
from moekit.routing.projection import router_precision
from moekit.routing.result import RoutingResult
from moekit.routing.soft import SoftRoutingResult
from moekit.utils.validation import check_fields, check_layer_input

_UNKNOWN = object()  # the weights' device, not looked up yet


@dataclass(kw_only=True)
class MoEConfig:
    """Everything that builds an :class:`MoE` layer.

    The layer's width is context, given at build time: ``build(d_model=...)`` (a model passes
    its own).

    Args:
        d_model: deprecated; pass it to ``build(d_model=...)`` instead (kept so that
            ``MoEConfig( ...).build(d_model=D)`` still works, with a ``DeprecationWarning``).
        num_experts: routed experts E.
        top_k: experts per token K (1 <= K <= E).
        experts: routed expert shape (hidden width, activation, bias).
        router: router options.
        dispatch: dropless or capacity, capacity factors, drop priority.
        shared_experts: always-on experts, or ``None``.
        aux_loss: auxiliary-loss weights.
        check_finite: raise on NaN/Inf inputs (costs one reduction per call).
        statistics: compute ``MoEOutput.stats`` (tokens per expert, drops, entropy); off, the
            layer does no statistics work at all.
        zero_computation: zero-computation experts (zero, copy, constant) the router may
            choose besides the ``num_experts`` real ones (MoE++, LongCat-Flash), or ``None``.
        output_bias: a learned bias added to the layer's output (JetMoE).
        expert_scales: a learned scale per routed expert ``(E,)`` multiplies each chosen
            expert's combine weight (Gemma 4's ``per_expert_scale``).
    """

    d_model: InitVar[int | None] = None
    num_experts: int
    top_k: int
    experts: ExpertConfig
    router: RouterOptions = field(default_factory=TopKRouterConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    shared_experts: SharedExpertConfig | None = None
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    check_finite: bool = False
    statistics: bool = True
    zero_computation: ZeroComputationConfig | None = None
    output_bias: bool = False
    expert_scales: bool = False

    def __post_init__(self, d_model: int | None) -> None:
        check_fields(self)
        if d_model is not None:
            warnings.warn(
                "MoEConfig(d_model=...) is deprecated: pass the width to build(d_model=...); "
                "inside a model config leave it out (the model's is used)",
                DeprecationWarning,
                stacklevel=3,
            )
        self._legacy_d_model = d_model
        self.router.validate_for(self.routed_choices, self.top_k)
        if self.zero_computation is not None and self.router.kind in (
            RouterKind.SOFT,
            RouterKind.CAUSAL_SOFT,
            RouterKind.EXPERT_CHOICE,
            RouterKind.DENSE,
        ):
            raise ValueError(
                f"zero_computation experts need a token-choice router, not kind="
                f"{self.router.kind.value!r}"
            )

        target = getattr(self.zero_computation, "target_experts_per_token", None)
        if target is not None and self.router.kind is not RouterKind.TOP_K:
            raise ValueError(
                "zero_computation.target_experts_per_token needs router kind 'top_k', not "
                f"{self.router.kind.value!r}"
            )
        if target is not None and target > self.top_k:
            raise ValueError(
                f"zero_computation.target_experts_per_token must be <= top_k={self.top_k}, "
                f"got {target}"
            )
        if self.aux_loss.load > 0 and not getattr(self.router, "noisy_gating", False):
            raise ValueError("aux_loss.load > 0 needs router.noisy_gating=True (Shazeer et al.)")
        if self.aux_loss.load > 0 and self.top_k >= self.num_experts:
            raise ValueError(
                f"aux_loss.load > 0 needs top_k < num_experts (the load estimator compares each "
                f"logit with the k-th and (k+1)-th), got top_k={self.top_k}, "
                f"num_experts={self.num_experts}"
            )

    @property
    def routed_choices(self) -> int:
        """The experts the router scores: the real ones plus the zero-computation ones."""
        extra = 0 if self.zero_computation is None else self.zero_computation.count
        return self.num_experts + extra

    def build(self, *, d_model: int | None = None) -> MoE:
        """An :class:`MoE` layer on a stream of width ``d_model`` (a :class:`SoftMoE` for
        ``router.kind='soft'``)."""
        d_model = d_model or getattr(self, "_legacy_d_model", None)
        if d_model is None or d_model < 1:
            raise ValueError(f"MoEConfig.build needs d_model >= 1, got {d_model}")
        layer_cls = {RouterKind.SOFT: SoftMoE, RouterKind.CAUSAL_SOFT: CausalSoftMoE}.get(
            self.router.kind, MoE
        )
        return layer_cls(
            d_model=d_model,
            router=self.router.build(
                d_model=d_model, num_experts=self.routed_choices, top_k=self.top_k
            ),
            experts=self.experts.build(num_experts=self.num_experts, d_model=d_model),
            dispatch=self.dispatch,
            shared_experts=(
                None if self.shared_experts is None else self.shared_experts.build(d_model=d_model)
            ),
            aux_loss=self.aux_loss,
            check_finite=self.check_finite,
            statistics=self.statistics,
            zero_computation=(
                None
                if self.zero_computation is None
                else self.zero_computation.build(d_model=d_model)
            ),
            output_bias=self.output_bias,
            expert_scales=self.expert_scales,
        )


# the deprecated keyword reads back as what was given (None: the config has no width of its own;
# ``dataclasses.replace`` carries it over)
MoEConfig.d_model = property(  # type: ignore[attr-defined]
    lambda self: self._legacy_d_model,
    doc="Deprecated: the width given as MoEConfig(d_model=...), else None.",
)


@dataclass
class MoEOutput:
    """What one MoE call returns.

    Attributes:
        output: same shape as the input.
        aux_loss: scalar, the weighted sum of ``losses`` (add it to the task loss).
        losses: unweighted auxiliary losses by name (``switch``, ``z_loss``, ``importance``,
            ``load``), only those with a non-zero weight.
        stats: routing statistics of the call (``None`` with ``statistics=False``).
        routing: the router's raw decision (indices, weights, logits, probabilities), or a
            ``SoftRoutingResult`` for Soft MoE.
        inner_outputs: outputs of MoE layers serving as experts (hierarchical MoE); their
            auxiliary losses are already included in ``aux_loss``.
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: RoutingStats | None
    routing: RoutingResult | SoftRoutingResult
    inner_outputs: list[MoEOutput] = field(default_factory=list)


class MoE(nn.Module):
    """Mixture-of-Experts layer ``(..., D) -> MoEOutput`` whose ``output`` is ``(..., D)``.

    Forward steps, each one call into the package that owns it:
        1. route (``routing/``): each token gets K experts and combine weights;
        2. plan (``dispatch/``): sort assignments by expert, drop padding and, with capacity,
           overflow;
        3. dispatch, expert compute, combine (``dispatch/`` + ``experts/``): gather rows, one
           grouped matmul per projection, weight each row and sum it into its token (dropped
           rows add zero, so the caller's residual carries a dropped token unchanged);
        4. add the shared experts;
        5. auxiliary losses (``losses/``) and routing statistics (``analysis/``).

    Built by composition: any router with the ``Router`` call (``routing/result.py``) and any
    expert bank with ``bank(x_MD, counts_E)`` (``ExpertBank``, ``ModuleExperts``) fit. Expert
    parallelism replaces ``dispatcher`` (``moekit.distributed``); nothing else changes.
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
        statistics: bool = True,
        zero_computation: nn.Module | None = None,
        output_bias: bool = False,
        expert_scales: bool = False,
    ) -> None:
        super().__init__()
        router_experts = int(cast(Any, router).num_experts)
        bank_experts = int(cast(Any, experts).num_experts)
        special = 0 if zero_computation is None else int(cast(Any, zero_computation).config.count)
        if router_experts != bank_experts + special:
            raise ValueError(
                f"router has {router_experts} experts but the expert bank has {bank_experts}"
                + (f" and {special} zero-computation experts" if special else "")
            )
        if getattr(router, "soft", False) and not isinstance(self, SoftMoE):
            raise TypeError("a Soft MoE router needs the SoftMoE layer (MoEConfig.build picks it)")
        self.d_model = d_model
        self.num_experts: int = int(cast(Any, experts).num_experts)  # the bank's (real) experts
        self.zero_computation = zero_computation
        zero = 0 if zero_computation is None else int(cast(Any, zero_computation).config.zero)
        if zero and hasattr(router, "add_null_slots"):  # elastic experts per token
            cfg = cast(Any, zero_computation).config
            cast(Any, router).add_null_slots(
                first=self.num_experts,
                count=zero,
                target=cfg.target_experts_per_token,
                rate=cfg.offset_rate,
            )
        self.output_bias_D = nn.Parameter(torch.zeros(d_model)) if output_bias else None
        self.expert_scale_E = nn.Parameter(torch.ones(router_experts)) if expert_scales else None
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.dispatcher = (dispatch or DispatchConfig()).build(num_experts=self.num_experts)
        self.aux_loss = aux_loss or AuxLossConfig()
        self.check_finite = check_finite
        self.statistics = statistics
        # off inside ``moekit.serving(model)``: no auxiliary losses (``aux_loss`` is 0)
        self.losses_enabled = True
        # global-batch balancing (moekit.losses.global_batch): the pre-pass's running sums while
        # it runs, then the optimizer step's sums the losses use
        self.balance_tally: BalanceTally | None = None
        self.global_balance: GlobalBalance | None = None

    @property
    def dispatch(self) -> DispatchConfig:
        """The dispatch options (the dispatcher's; setting them changes the dispatcher's)."""
        return self.dispatcher.config

    @dispatch.setter
    def dispatch(self, config: DispatchConfig) -> None:
        self.dispatcher.config = config

    def _weight_device(self) -> torch.device | None:
        """Where the layer's tensors are (``None`` for a layer without any); looked up once
        after each move (``_apply``: ``to``, ``cuda``, ``to_empty``), not on every call."""
        cached = self.__dict__.get("_device_of_weights", _UNKNOWN)
        if cached is _UNKNOWN:
            cached = next(
                (t.device for t in itertools.chain(self.parameters(), self.buffers())), None
            )
            self.__dict__["_device_of_weights"] = cached
        return cast(torch.device | None, cached)

    def _apply(self, fn: Any, recurse: bool = True) -> MoE:
        self.__dict__.pop("_device_of_weights", None)  # moved: look the device up again
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_device_of_weights", None)  # load_state_dict(assign=True) may move
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def top_k(self) -> int:
        """Expert slots per token in the routing result (E for dense and expert choice); the
        router's, so ``moekit.set_top_k`` changes both."""
        return int(cast(Any, self.router).top_k)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        *,
        route_on: torch.Tensor | None = None,
    ) -> MoEOutput:
        """Args:
        x: ``(..., D)`` floating-point input.
        padding_mask: ``x.shape[:-1]`` bool, ``True`` for real tokens. Padding is not
            dispatched (its routed output is zero), uses no capacity and is left out of the
            losses and statistics.
        token_ids: ``x.shape[:-1]`` integer token ids, for routers that route by id (hash).
        route_on: what the router reads when it is not ``x`` (``x``'s shape; Gemma 4 routes
            on the residual stream while its experts read a normalised copy).
        """
        check_layer_input(
            x, self.d_model, padding_mask, token_ids, self.check_finite, self._weight_device()
        )
        x_TD = x.reshape(-1, self.d_model)
        mask_T = None if padding_mask is None else padding_mask.reshape(-1)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        seq_len = x.shape[-2] if x.dim() >= 3 else None

        routing = self._route(x_TD, route_on, ids_T, mask_T)  # 1
        y_TD, plan = self._experts_output(x_TD, routing, mask_T, seq_len)  # 2-4
        aux_loss, losses, inner = self._losses_of_call(routing, mask_T, seq_len)  # 5
        stats = None
        if self.statistics and plan is not None:
            stats = routing_stats(routing, plan, mask_T, self.dispatcher.global_sum)
        record_load = getattr(self.router, "record_load", None)
        # bias balancing, global under EP (the pre-pass must not count the step twice)
        if self.training and record_load is not None and self.balance_tally is None:
            assert plan is not None  # training always dispatches
            record_load(self.dispatcher.global_sum(plan.routed_per_expert_E.detach()))
        return MoEOutput(y_TD.view(x.shape), aux_loss, losses, stats, routing, inner)

    def _experts_output(
        self,
        x_TD: torch.Tensor,
        routing: RoutingResult,
        mask_T: torch.Tensor | None,
        seq_len: int | None,
    ) -> tuple[torch.Tensor, DispatchPlan | None]:
        """``(T, D)``: the routed experts' combined output (a decoding step's handful of tokens
        skips the dispatch: nothing reads its plan), plus the zero-computation slots, shared
        experts and output bias; and the dispatch plan (``None`` on the direct path)."""
        plan = None
        if self._direct(x_TD, routing):
            bank = cast(Any, self.experts)
            y_TD = direct_experts(x_TD, routing, bank, self.num_experts, mask_T)
        else:
            plan = self.dispatcher.plan(self._bank_slots(routing), mask_T, seq_len, self.training)
            y_TD = self.dispatcher.run(x_TD, plan, self.experts)
        if self.zero_computation is not None:
            y_TD = y_TD + self._special_output(x_TD, routing, mask_T).to(y_TD.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)
        if self.output_bias_D is not None:
            y_TD = y_TD + self.output_bias_D.to(y_TD.dtype)
        return y_TD, plan

    def _losses_of_call(
        self, routing: RoutingResult, mask_T: torch.Tensor | None, seq_len: int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[MoEOutput]]:
        """``(weighted auxiliary loss, each configured loss, nested layers' outputs)``; the
        global-batch pre-pass tallies the routing instead."""
        if self.balance_tally is not None:  # the pre-pass of a global-batch step
            self.balance_tally.add(routing, mask_T)
        losses = self._losses(routing, mask_T, seq_len) if self.losses_enabled else {}
        inner: list[MoEOutput] = getattr(self.experts, "take_inner_outputs", list)()
        aux_loss = weighted_sum(losses, self.aux_loss, start=routing.weights_TK.new_zeros(()))
        if inner:  # hierarchical MoE: the nested layers' losses too
            aux_loss = aux_loss + sum(out.aux_loss for out in inner)
        return aux_loss, losses, inner

    def _route(
        self,
        x_TD: torch.Tensor,
        route_on: torch.Tensor | None,
        ids_T: torch.Tensor | None,
        mask_T: torch.Tensor | None,
    ) -> RoutingResult:
        """The router's decision on ``x_TD`` (or on ``route_on``, what it reads instead), each
        chosen expert's weight times its learned scale when the layer has ``expert_scales``
        (Gemma 4)."""
        inputs_TD = x_TD if route_on is None else route_on.reshape(-1, self.d_model)
        with router_precision(x_TD.device, _router_float32(self.router)):
            routing = self.router(inputs_TD, ids_T, mask_T)
        if self.expert_scale_E is None:
            return routing
        scale_TK = self.expert_scale_E.to(routing.weights_TK.dtype)[routing.expert_idx_TK]
        return dataclasses.replace(routing, weights_TK=routing.weights_TK * scale_TK)

    def _direct(self, x_TD: torch.Tensor, routing: RoutingResult) -> bool:
        """Whether this call takes the direct expert path (``moekit.dispatch.direct``): nothing
        reads a dispatch plan (evaluation, statistics off), the dispatch is this process's and
        dropless, and the call is decoding-sized on the CPU."""
        return (
            not (self.statistics or self.training)
            and type(self.dispatcher) is Dispatcher
            and self.dispatch.mode is DispatchMode.DROPLESS
            and direct_applies(x_TD, routing, self.experts)
        )

    def _bank_slots(self, routing: RoutingResult) -> RoutingResult:
        """The routing the expert bank sees: zero-computation slots masked out."""
        if self.zero_computation is None:
            return routing
        real_TK = routing.expert_idx_TK < self.num_experts
        if routing.assignment_mask_TK is not None:
            real_TK = real_TK & routing.assignment_mask_TK
        return dataclasses.replace(routing, assignment_mask_TK=real_TK)

    def _special_output(
        self, x_TD: torch.Tensor, routing: RoutingResult, mask_T: torch.Tensor | None
    ) -> torch.Tensor:
        """``(T, D)``: what the zero-computation slots add (padding: nothing)."""
        special_TD = cast(Any, self.zero_computation)(
            x_TD, routing.expert_idx_TK, routing.weights_TK, self.num_experts
        )
        if mask_T is not None:
            special_TD = special_TD * mask_T.unsqueeze(-1).to(special_TD.dtype)
        return special_TD

    def _losses(
        self, routing: RoutingResult, mask_T: torch.Tensor | None, seq_len: int | None
    ) -> dict[str, torch.Tensor]:
        """The configured auxiliary losses of this call (in the router's precision)."""
        with router_precision(routing.logits_TE.device, _router_float32(self.router)):
            return auxiliary_losses(
                routing,
                self.aux_loss,
                token_mask_T=mask_T,
                sequence_length=seq_len,
                global_sum=self.dispatcher.global_sum,
                differentiable_global_sum=self.dispatcher.differentiable_global_sum,
                global_balance=self.global_balance,
            )


class SoftMoE(MoE):
    """Soft MoE layer (Puigcerver et al. 2023): ``(B, S, D)`` or ``(S, D) -> MoEOutput``.

    Forward steps: 1. slot weights (the router), 2. slots as convex mixes of each sequence's
    tokens, 3. experts on their slots, 4. tokens as convex mixes of slot outputs, 5. shared
    experts. Nothing is dropped and no balancing loss is needed; padding takes no part in any
    slot and gets zero output.
    """

    mix = staticmethod(soft_dispatch_and_combine)  # steps 2-4

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        *,
        route_on: torch.Tensor | None = None,
    ) -> MoEOutput:
        check_layer_input(
            x, self.d_model, padding_mask, token_ids, self.check_finite, self._weight_device()
        )
        if route_on is not None:
            raise ValueError("Soft MoE mixes the tokens it dispatches; it has no route_on")
        if (x.dim() < 3 and x.numel() == 0) or (x.dim() >= 2 and x.shape[-2] == 0):
            return _soft_empty_output(self, x)
        S = x.shape[-2] if x.dim() >= 2 else 1
        x_BSD = x.reshape(-1, S, self.d_model)
        mask_BS = None if padding_mask is None else padding_mask.reshape(-1, S)
        with router_precision(x.device, _router_float32(self.router)):
            routing = self.router(x_BSD, mask_BS)
        y_BSD = self.mix(x_BSD, routing, self.experts, self.num_experts)
        if mask_BS is not None:
            y_BSD = y_BSD * mask_BS.unsqueeze(-1).to(y_BSD.dtype)
        if self.shared_experts is not None:
            y_BSD = y_BSD + self.shared_experts(x_BSD).to(y_BSD.dtype)
        stats = soft_routing_stats(routing, x_BSD, mask_BS) if self.statistics else None
        zero = x.new_zeros((), dtype=torch.float32)
        return MoEOutput(y_BSD.reshape(x.shape), zero, {}, stats, routing)


class CausalSoftMoE(SoftMoE):
    """Causal Soft MoE (``moekit.routing.causal_soft``): each token's slots mix the tokens up to
    it; the other steps are Soft MoE's."""

    mix = staticmethod(causal_soft_dispatch_and_combine)
    decodes_with_cache = False  # its prefix sums are not kept between decoding steps


def _soft_empty_output(layer: SoftMoE, x: torch.Tensor) -> MoEOutput:
    """Soft MoE's output for an input without tokens: empty, like every other layer's."""
    slots_per_expert = int(cast(Any, layer.router).slots_per_expert)
    empty = x.new_zeros(0, 0, layer.num_experts * slots_per_expert, dtype=torch.float32)
    routing = SoftRoutingResult(empty, empty, empty, slots_per_expert)
    stats = None
    if layer.statistics:
        stats = soft_routing_stats(routing, x.new_zeros(0, 1, layer.d_model), None)
    zero = x.new_zeros((), dtype=torch.float32)
    return MoEOutput(torch.zeros_like(x), zero, {}, stats, routing)


def _router_float32(router: nn.Module) -> bool:
    """Whether ``router`` computes in at least float32 (its config's ``float32``)."""
    return bool(getattr(getattr(router, "config", None), "float32", False))
