"""SparseMixer routing (Liu et al. 2024, "GRIN: GRadient-INformed MoE", arXiv:2409.12136), the
router of Phi-3.5-MoE.

Legend: T = tokens, D = d_model, E = experts, K = experts per token.

The K experts are chosen one after another. In round ``j`` (the experts already chosen masked
out), with ``m`` the best remaining logit, an expert ``e`` stays a candidate when
``(m - s_e) / max(|s_e|, m) <= 2 * eps`` (``eps``: ``jitter_eps``); the weight of the chosen
expert is its softmax probability among the candidates. At inference the chosen expert is the
best remaining one. In training it is *sampled* among the candidates (Gumbel-max), and its weight's
gradient follows GRIN's estimator: ``dL/ds = w * g * (onehot(chosen) - p)`` (``p``: the
candidates' softmax), with the forward weight scaled by 1 when the sample is the best candidate
(or, with probability 1/4, anyway) and by 1/3 otherwise (Heun's third-order midpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.projection import router_dtype
from moekit.routing.result import RoutingResult
from moekit.utils.randomness import exponential_like, jitter_like, uniform_like

_ANONYMOUS = nn.Module()  # draw site of calls without a module (not keyed by a model)


@dataclass(kw_only=True)
class SparseMixerRouterConfig(GateOptions, RouterOptions):
    """SparseMixer routing (``moekit.routing.sparsemixer`` has the rule).

    Args:
        jitter_eps: the candidate threshold ``eps`` (Phi-3.5-MoE: 0.01).
        input_jitter_eps: multiplicative input jitter U(1-eps, 1+eps) in training (0: off).
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.SPARSEMIXER, init=False)
    jitter_eps: float = 0.01
    input_jitter_eps: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.jitter_eps < 0 or not 0 <= self.input_jitter_eps < 1:
            raise ValueError(
                f"jitter_eps must be >= 0 and input_jitter_eps in [0, 1), got {self.jitter_eps} "
                f"and {self.input_jitter_eps}"
            )

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> SparseMixerRouter:
        return SparseMixerRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class _HeunMultiplier(torch.autograd.Function):
    """``w * scale`` forward; GRIN's gradient ``w * g * (onehot(chosen) - p)`` to the logits."""

    @staticmethod
    def forward(ctx, scores_TE, weight_T1, chosen_T1, probs_TE, scale_T1):  # type: ignore[override]
        ctx.save_for_backward(weight_T1, chosen_T1, probs_TE)
        return weight_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):  # type: ignore[override]
        weight_T1, chosen_T1, probs_TE = ctx.saved_tensors
        grad_T1 = grad_T1 * weight_T1
        grad_TE = -probs_TE * grad_T1
        grad_TE = grad_TE.scatter_add(-1, chosen_T1, grad_T1)
        return grad_TE, None, None, None, None


def sparsemixer(
    scores_TE: torch.Tensor,
    top_k: int,
    jitter_eps: float,
    training: bool,
    forced_TK: torch.Tensor | None = None,
    draw_site: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (T, K), experts (T, K))`` of SparseMixer on router logits ``scores_TE``;
    ``forced_TK``: the experts to take in each round (a replayed trace), weighted as if chosen;
    ``draw_site``: the module whose key the random draws take under
    :func:`moekit.utils.randomness.token_randomness` (torch's generator without it)."""
    site = draw_site if draw_site is not None else _ANONYMOUS
    masked_TE = scores_TE
    weights: list[torch.Tensor] = []
    chosen: list[torch.Tensor] = []
    for _ in range(top_k):  # K rounds, each over every token at once
        with torch.no_grad():
            best_T1, best_idx_T1 = masked_TE.max(dim=-1, keepdim=True)
            factor_TE = scores_TE.abs().clamp(min=best_T1)
            outside_TE = ((best_T1 - scores_TE) / factor_TE) > 2 * jitter_eps
        gates_TE = masked_TE.masked_fill(outside_TE, float("-inf"))
        if forced_TK is not None:
            pick_T1 = forced_TK[:, len(chosen)].unsqueeze(-1)
        elif training:  # Gumbel-max sampling among the candidates
            noise = exponential_like(gates_TE, site, f"gumbel{len(chosen)}").log()
            pick_T1 = (gates_TE - noise).argmax(dim=-1, keepdim=True)
        else:
            pick_T1 = best_idx_T1
        probs_TE = torch.softmax(gates_TE, dim=-1)
        weight_T1 = probs_TE.gather(-1, pick_T1)
        if training:
            best_prob_idx = probs_TE.argmax(dim=-1, keepdim=True)
            one = (pick_T1 == best_prob_idx) | (
                uniform_like(weight_T1, site, f"heun{len(chosen)}") > 0.75
            )
            scale_T1 = torch.add(0.3333, one.to(weight_T1.dtype), alpha=0.6667)
            weight_T1 = _HeunMultiplier.apply(
                scores_TE, weight_T1.detach(), pick_T1, probs_TE.detach(), scale_T1
            )
        weights.append(weight_T1)
        chosen.append(pick_T1)
        masked_TE = masked_TE.scatter(-1, pick_T1, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


class SparseMixerRouter(GatedRouter):
    """SparseMixer router: ``(T, D) -> RoutingResult``; parameters ``weight_ED`` (and
    ``bias_E``)."""

    def __init__(
        self, config: SparseMixerRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        # set by moekit.replay_routing: returns the recorded (T, K) experts of the next call
        self.forced_routes: Callable[[int], torch.Tensor] | None = None

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        cfg = self.config
        x_TD = x_TD.to(router_dtype(x_TD, cfg.float32))
        if self.training and cfg.input_jitter_eps > 0:
            eps = cfg.input_jitter_eps
            x_TD = x_TD * jitter_like(x_TD, self, "jitter", eps)
        logits_TE = self.gate_logits(x_TD)
        forced = None
        if self.forced_routes is not None:
            forced = self.forced_routes(logits_TE.shape[0]).to(logits_TE.device)
            if forced.shape != (logits_TE.shape[0], self.top_k):
                raise ValueError(
                    f"the replayed routes are {tuple(forced.shape)} but this call routes "
                    f"{logits_TE.shape[0]} tokens to top_k={self.top_k} experts"
                )
        weights_TK, expert_idx_TK = sparsemixer(
            logits_TE, self.top_k, cfg.jitter_eps, self.training, forced, self
        )
        return RoutingResult(
            expert_idx_TK=expert_idx_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            probs_TE=torch.softmax(logits_TE, dim=-1),
        )
