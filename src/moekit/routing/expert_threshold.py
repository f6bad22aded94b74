"""Expert-Threshold routing: expert choice made causal (arXiv 2603.11535).

Expert choice (Zhou et al. 2022) balances load perfectly: expert ``e`` takes the ``c_e =
ceil(c T / E)`` tokens with the highest score for it. But whether a token makes an expert's
cut depends on every other token of the batch, later ones included, so a decoder cannot use it.
Expert-Threshold routing keeps expert choice's rule and moves the cut into the past: each
expert holds a threshold ``τ_e``, a token goes to every expert whose score for it reaches that
expert's threshold, and the thresholds are an exponential moving average of the cut expert
choice *would* have made on past training batches:

    S = softmax(x W)                      (T, E): scores, as expert choice
    route t to e  ⇔  S[t, e] ≥ τ_e        (0..E experts per token; none: the residual passes)
    after each optimizer step: τ ← m τ + (1 - m) mean over the step's calls of cut_e,
    cut_e = the c_e-th highest S[:, e] of a call (padding excluded)

So a token's route depends on its own scores and on state from earlier batches only: training,
evaluation and token-by-token decoding use one rule. Before the first update the thresholds do
not exist yet, and each token takes its ``warmup_top_k`` best experts (token choice, causal).
The average number of experts per token tracks ``c`` as the thresholds settle; no auxiliary
loss is needed for balance. Combine weights are the scores (as expert choice), with gradients.

The cut statistics are tallied in buffers in the training forward (averaged, so activation
checkpointing's second forward changes nothing) and applied by
:func:`moekit.update_expert_thresholds` (the training loop calls it after every step, summing
the tallies over data-parallel ranks first, so every rank keeps the same thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moekit.routing.config import GatedRouter, GateOptions, RouterKind, RouterOptions
from moekit.routing.result import RoutingResult


@dataclass(kw_only=True)
class ExpertThresholdRouterConfig(GateOptions, RouterOptions):
    """Expert-Threshold routing (causal expert choice).

    Args:
        capacity_factor: ``c``, the average number of experts per token the thresholds aim at:
            each is the cut at expert choice's ``ceil(c T / E)``-th token.
        threshold_momentum: ``m`` of the moving average (the share of the old thresholds kept
            at each update), in [0, 1).
        warmup_top_k: experts per token before the first threshold update (token-choice top-k);
            ``None``: ``round(c)`` (at least 1).
        float32, bias: see ``GateOptions``.
    """

    kind: RouterKind = field(default=RouterKind.EXPERT_THRESHOLD, init=False)
    causal: ClassVar[bool] = True  # thresholds come from past batches only
    capacity_factor: float = 2.0
    threshold_momentum: float = 0.9
    warmup_top_k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")
        if self.warmup_top_k is not None and self.warmup_top_k < 1:
            raise ValueError(f"warmup_top_k must be >= 1, got {self.warmup_top_k}")

    def validate_for(self, num_experts: int, top_k: int) -> None:
        super().validate_for(num_experts, top_k)
        if self.warmup_top_k is not None and self.warmup_top_k > num_experts:
            raise ValueError(
                f"warmup_top_k must be <= num_experts={num_experts}, got {self.warmup_top_k}"
            )

    def build(self, *, d_model: int, num_experts: int, top_k: int) -> ExpertThresholdRouter:
        """The ``ExpertThresholdRouter`` of this config."""
        return ExpertThresholdRouter(self, d_model=d_model, num_experts=num_experts, top_k=top_k)


class ExpertThresholdRouter(GatedRouter):
    """``(T, D) -> RoutingResult``: K = E slots per token, masked to the experts whose
    threshold the token's score reaches (on the batch the thresholds came from, that is
    expert choice's assignment).

    Buffers: ``threshold_E`` (``τ``), ``thresholds_set`` (whether one update has happened),
    ``cut_tally_E`` and ``cut_calls`` (the cuts of the calls since the last update).
    """

    threshold_E: torch.Tensor
    thresholds_set: torch.Tensor
    cut_tally_E: torch.Tensor
    cut_calls: torch.Tensor

    def __init__(
        self, config: ExpertThresholdRouterConfig, *, d_model: int, num_experts: int, top_k: int
    ) -> None:
        super().__init__(config, d_model=d_model, num_experts=num_experts, top_k=top_k)
        self.top_k = num_experts
        self.warmup_top_k = config.warmup_top_k or max(1, round(config.capacity_factor))
        self.warmup_top_k = min(self.warmup_top_k, num_experts)
        self.register_buffer("threshold_E", torch.zeros(num_experts))
        self.register_buffer("thresholds_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("cut_tally_E", torch.zeros(num_experts))
        self.register_buffer("cut_calls", torch.zeros(()))

    def forward(
        self,
        x_TD: torch.Tensor,
        token_ids_T: torch.Tensor | None = None,
        token_mask_T: torch.Tensor | None = None,
    ) -> RoutingResult:
        logits_TE = self.gate_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        scores_TE = probs_TE.detach()
        above_TE = scores_TE >= self.threshold_E.to(scores_TE.dtype)
        warm_TE = torch.zeros_like(above_TE).scatter_(
            1, scores_TE.topk(self.warmup_top_k, dim=-1).indices, True
        )
        mask_TE = torch.where(self.thresholds_set, above_TE, warm_TE)
        if token_mask_T is not None:
            mask_TE = mask_TE & token_mask_T.unsqueeze(1)
        if self.training and T > 0:
            self._tally_cut(scores_TE, token_mask_T)
        expert_idx_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        return RoutingResult(
            expert_idx_TK, probs_TE, logits_TE, probs_TE, assignment_mask_TK=mask_TE
        )

    @torch.no_grad()
    def _tally_cut(self, scores_TE: torch.Tensor, token_mask_T: torch.Tensor | None) -> None:
        """Add this call's expert-choice cut (the ``ceil(c n / E)``-th highest score of each
        expert over the ``n`` real tokens) to the tally; no host sync."""
        T, E = scores_TE.shape
        if token_mask_T is None:
            n = torch.full((), T, device=scores_TE.device)
            ranked_TE = scores_TE.sort(dim=0, descending=True).values
        else:
            n = token_mask_T.sum()
            padded = scores_TE.masked_fill(~token_mask_T.unsqueeze(1), -1.0)
            ranked_TE = padded.sort(dim=0, descending=True).values
        cut = torch.ceil(self.config.capacity_factor * n.float() / E).long().clamp(1, T) - 1
        cut_E = ranked_TE.gather(0, cut.view(1, 1).expand(1, E)).squeeze(0).clamp(min=0.0)
        counted = (n > 0).to(self.cut_tally_E.dtype)
        self.cut_tally_E += cut_E.to(self.cut_tally_E.dtype) * counted
        self.cut_calls += counted

    @torch.no_grad()
    def update_thresholds(self, momentum: float | None = None) -> None:
        """Fold the tallied cuts into the thresholds (the first update takes them as they
        are) and clear the tally; a no-op when nothing was tallied. No host sync."""
        m = self.config.threshold_momentum if momentum is None else momentum
        tallied = self.cut_calls > 0
        mean_E = self.cut_tally_E / self.cut_calls.clamp(min=1.0)
        blended_E = torch.where(
            self.thresholds_set, m * self.threshold_E + (1 - m) * mean_E, mean_E
        )
        self.threshold_E.copy_(torch.where(tallied, blended_E, self.threshold_E))
        self.thresholds_set |= tallied
        self.cut_tally_E.zero_()
        self.cut_calls.zero_()

    def extra_repr(self) -> str:
        c, m = self.config.capacity_factor, self.config.threshold_momentum
        return f"{super().extra_repr()}, capacity_factor={c}, momentum={m}"
