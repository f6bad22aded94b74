"""Token-choice top-k routing: each token picks K of E experts.

Legend: T = tokens, D = d_model, E = experts, K = experts per token, G = expert groups.

One router covers the token-choice routers that shipped models use:

* ``softmax_topk``: p = softmax(x W_g); keep the top K of p, optionally renormalised to sum 1
  (Shazeer et al. 2017 without noise; Switch with K=1; Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2).
* ``topk_softmax``: keep the top K logits, softmax over those K (Shazeer et al. 2017's
  ``Softmax(KeepTopK(H, k))``; GPT-OSS).
* ``sigmoid_topk``: s = sigmoid(x W_g); keep the top K, optionally renormalised (DeepSeek-V3).
* ``sqrt_softplus_topk``: s = sqrt(softplus(x W_g)); keep the top K, optionally renormalised
  (DeepSeek-V4).

Options: a routed scaling factor on the weights; router math in at least float32; multiplicative
input jitter in training (Switch Transformer, x * U(1-eps, 1+eps)); **noisy top-k gating**
(Shazeer et al. 2017: H = x W_g + N(0, 1) * softplus(x W_noise), in training only);
**group-limited selection** (DeepSeek-V2/V3: score G groups, keep the best ``topk_groups``, then
pick K experts inside them); and an **expert bias used for selection only** (DeepSeek-V3's
auxiliary-loss-free balancing: experts are chosen by ``score + b``, weighted by ``score``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.null_slots import NullSlots
from moekit.routing.projection import (
    router_dtype,
    router_precision,
)
from moekit.routing.result import RoutingResult
from moekit.utils.randomness import jitter_like, normal_like


class Gating(str, Enum):
    """How scores become top-K weights."""

    SOFTMAX_TOPK = "softmax_topk"
    TOPK_SOFTMAX = "topk_softmax"
    SIGMOID_TOPK = "sigmoid_topk"
    SQRT_SOFTPLUS_TOPK = "sqrt_softplus_topk"


class GroupScore(str, Enum):
    """How a group of experts is scored for group-limited selection."""

    MAX = "max"  # DeepSeek-V2: best expert score in the group
    TOP2_SUM = "top2_sum"  # DeepSeek-V3: sum of the group's two best scores


@dataclass(kw_only=True)
class TopKRouterConfig(GateOptions, RouterOptions):
    """Token-choice top-K routing (``moekit.routing.topk`` has the formulas).

    Args:
        gating: ``softmax_topk``, ``topk_softmax``, ``sigmoid_topk`` or ``sqrt_softplus_topk``.
        normalize_weights: renormalise the K weights to sum 1 (``softmax_topk``/``sigmoid_topk``).
        routed_scaling_factor: multiply the combine weights by this (DeepSeek).
        jitter_eps: multiplicative input jitter U(1-eps, 1+eps) on the router input in training.
        noisy_gating: Shazeer et al. 2017 noisy top-k gating (trainable noise, training only).
        float32, bias: see ``GateOptions``.
        num_groups: expert groups for group-limited selection (1 = off).
        topk_groups: groups kept per token.
        group_score: ``max`` or ``top2_sum``.
        bias_balancing: keep an expert bias for auxiliary-loss-free balancing (DeepSeek-V3).
        bias_update_rate: the fixed step ``u`` of ``b_i += u * sign(mean load - load_i)``.
    """

    kind: RouterKind = field(default=RouterKind.TOP_K, init=False)
    gating: Gating = Gating.SOFTMAX_TOPK
    normalize_weights: bool = True
    routed_scaling_factor: float = 1.0
    jitter_eps: float = 0.0
    noisy_gating: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = GroupScore.MAX
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}"
            )
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        if num_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide num_experts={num_experts}")
        per_group = num_experts // self.num_groups
        if top_k > self.topk_groups * per_group:
            raise ValueError(
                f"top_k={top_k} exceeds the {self.topk_groups * per_group} experts in "
                f"topk_groups={self.topk_groups} groups of {per_group}"
            )
        if self.group_score is GroupScore.TOP2_SUM and self.num_groups > 1 and per_group < 2:
            raise ValueError("group_score='top2_sum' needs at least 2 experts per group")

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> TopKRouter:
        """The ``TopKRouter`` of this config."""
        return TopKRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class TopKRouter(GatedRouter):
    """Token-choice top-K router: ``(T, D) -> RoutingResult``.

    Parameters: ``weight_ED`` ``(E, D)`` (``nn.Linear`` layout and initialisation), optional
    ``bias_E``, and under noisy gating ``noise_weight_ED`` (zero-initialised, as in Shazeer et al.).
    Buffers under bias balancing: ``expert_bias_E`` (selection only) and ``load_since_update_E``,
    the tokens each expert received since the last :meth:`update_expert_bias`.
    """

    expert_bias_E: torch.Tensor | None
    load_since_update_E: torch.Tensor | None

    def __init__(
        self, config: TopKRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.noise_weight_ED = (
            nn.Parameter(torch.zeros(num_experts, d_model)) if config.noisy_gating else None
        )
        if config.bias_balancing:
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
            self.register_buffer("load_since_update_E", torch.zeros(num_experts))
        else:
            self.expert_bias_E = None
            self.load_since_update_E = None
        # set by moekit.replay_routing: returns the recorded (T, K) experts of the next call
        self.forced_routes: Callable[[int], torch.Tensor] | None = None
        # zero experts' selection offset (moekit.routing.null_slots), set by the MoE layer
        self.null_slots: NullSlots | None = None

    def add_null_slots(
        self, *, first: int, count: int, target: float | None = None, rate: float = 1e-3
    ) -> NullSlots:
        """Give the ``count`` zero experts from index ``first`` a selection offset (elastic
        experts per token); ``target``: real experts per token its controller aims at."""
        self.null_slots = NullSlots(
            first=first, count=count, num_choices=self.num_experts, target=target, rate=rate
        )
        return self.null_slots

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        cfg = self.config
        with router_precision(x_TD.device, cfg.float32):
            result = self._route(x_TD)
        if self.training and self.null_slots is not None and self.null_slots.target is not None:
            self.null_slots.record(result.expert_idx_TK, token_mask_T)
        return result

    def _route(self, x_TD: torch.Tensor) -> RoutingResult:
        cfg = self.config
        x_TD = x_TD.to(router_dtype(x_TD, cfg.float32))
        if self.training and cfg.jitter_eps > 0:
            x_TD = x_TD * jitter_like(x_TD, self, "jitter", cfg.jitter_eps)
        logits_TE = self.gate_logits(x_TD)
        dtype = logits_TE.dtype
        clean_logits_TE = noise_std_TE = None
        if self.noise_weight_ED is not None and self.training:
            clean_logits_TE = logits_TE
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight_ED.to(dtype)))
            logits_TE = clean_logits_TE + normal_like(logits_TE, self, "noise") * noise_std_TE

        if cfg.gating is Gating.SQRT_SOFTPLUS_TOPK:
            # positive scores; the balancing losses see them normalised to sum 1
            scores_TE = F.softplus(logits_TE).sqrt()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp(min=1e-20)
            expert_idx_TK = self._choose(scores_TE.detach())
            weights_TK = scores_TE.gather(-1, expert_idx_TK)
            if cfg.normalize_weights:
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        elif cfg.gating is Gating.SIGMOID_TOPK:
            # sigmoid scores normalised in log space: sigmoid(a) / sum sigmoid = softmax of
            # logsigmoid, which stays exact where every sigmoid underflows to 0 (0/0 otherwise)
            log_scores_TE = F.logsigmoid(logits_TE)
            scores_TE, probs_TE = log_scores_TE.exp(), torch.softmax(log_scores_TE, dim=-1)
            # selection by logit orders experts exactly like sigmoid, without underflow ties;
            # the selection bias and group scores are defined on the sigmoid scores
            plain = self.expert_bias_E is None and cfg.num_groups == 1
            # with a bias or groups, select on float32 scores whatever the router's dtype: bf16
            # sigmoid scores tie where the logits do not (and pick another expert than the
            # ungrouped path would)
            choice_TE = (
                logits_TE.detach() if plain else F.logsigmoid(logits_TE.detach().float()).exp()
            )
            expert_idx_TK = self._choose(choice_TE)
            if cfg.normalize_weights:
                weights_TK = torch.softmax(log_scores_TE.gather(-1, expert_idx_TK), dim=-1)
            else:
                weights_TK = scores_TE.gather(-1, expert_idx_TK)
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1)
            scores_TE = probs_TE if cfg.gating is Gating.SOFTMAX_TOPK else logits_TE
            if self._selects_plain_top_k():  # the chosen scores come with the choice
                weights_TK, expert_idx_TK = scores_TE.topk(self.top_k, dim=-1)
            else:
                expert_idx_TK = self._choose(scores_TE.detach())
                weights_TK = scores_TE.gather(-1, expert_idx_TK)
            if cfg.gating is Gating.TOPK_SOFTMAX:
                weights_TK = torch.softmax(weights_TK, dim=-1)
            elif cfg.normalize_weights:
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return RoutingResult(
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            clean_logits_TE=clean_logits_TE,
            noise_std_TE=noise_std_TE,
        )

    def _selects_plain_top_k(self) -> bool:
        """Whether the choice is the top K of the scores themselves: no selection bias, null
        slots, groups or replayed routes (the top-K values are then the chosen scores)."""
        return (
            self.forced_routes is None
            and self.null_slots is None
            and self.expert_bias_E is None
            and self.config.num_groups == 1
        )

    def _choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The experts of this call: selected from the scores, or replayed from a trace (the
        combine weights are then computed from the live scores of those experts)."""
        if self.forced_routes is None:
            return self._select(scores_TE)
        expert_idx_TK = self.forced_routes(scores_TE.shape[0]).to(scores_TE.device)
        if expert_idx_TK.shape != (scores_TE.shape[0], self.top_k):
            raise ValueError(
                f"the replayed routes are {tuple(expert_idx_TK.shape)} but this call routes "
                f"{scores_TE.shape[0]} tokens to top_k={self.top_k} experts"
            )
        # a row with -1 (a token the engine did not route: the last one, padding) routes live
        live_T1 = (expert_idx_TK < 0).any(dim=-1, keepdim=True)
        return torch.where(live_T1, self._select(scores_TE), expert_idx_TK)

    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Indices of the K chosen experts, ``(T, K)``: bias-shifted, group-limited top-K."""
        cfg = self.config
        if self.null_slots is not None:
            scores_TE = self.null_slots.shift(scores_TE)
        if self.expert_bias_E is not None:
            scores_TE = scores_TE + self.expert_bias_E.to(scores_TE.dtype)
        if cfg.num_groups > 1:
            T = scores_TE.shape[0]
            grouped_TGX = scores_TE.view(T, cfg.num_groups, -1)
            if cfg.group_score is GroupScore.MAX:
                group_scores_TG = grouped_TGX.amax(dim=-1)
            else:
                group_scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
            kept_groups = group_scores_TG.topk(cfg.topk_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
            keep_TG.scatter_(1, kept_groups, True)
            scores_TE = grouped_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, -1)
        return scores_TE.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def record_load(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Add one training step's routed tokens per expert to the bias-balancing tally."""
        if self.load_since_update_E is not None:
            self.load_since_update_E += tokens_per_expert_E.to(self.load_since_update_E.dtype)

    @torch.no_grad()
    def update_expert_bias(self, rate: float | None = None) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing step (Wang et al. 2024, "Auxiliary-Loss-Free
        Load Balancing Strategy for Mixture-of-Experts"): ``b_i += u * sign(mean(load) - load_i)``
        over the load recorded since the last update, then clear the tally. Overloaded experts
        become less likely to be selected, underloaded ones more. No-op without bias balancing.
        """
        if self.expert_bias_E is None or self.load_since_update_E is None:
            return
        load_E = self.load_since_update_E
        step = self.config.bias_update_rate if rate is None else rate
        # sign(mean - load) is 0 for every expert when nothing was routed: no host sync needed
        self.expert_bias_E += step * torch.sign(load_E.mean() - load_E)
        load_E.zero_()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"gating={self.config.gating.value}"
        )
