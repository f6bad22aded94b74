"""A slow, per-token reference of the top-K router, for tests and for reading the math.

Random draws (jitter, then gating noise) are taken as whole tensors in the same order as the
fast router, so with the same seed both see the same noise.
"""

from __future__ import annotations

import math

import torch

from moekit.routing.result import RoutingResult
from moekit.routing.topk import Gating, GroupScore, TopKRouter


def reference_route(router: TopKRouter, x_TD: torch.Tensor) -> RoutingResult:
    """Route token by token with Python sorting; same contract as ``router(x_TD)``."""
    cfg = router.config
    dtype = torch.promote_types(x_TD.dtype, torch.float32) if cfg.float32 else x_TD.dtype
    x_TD = x_TD.to(dtype)
    T, E, K = x_TD.shape[0], router.num_experts, router.top_k
    if router.training and cfg.jitter_eps > 0:
        x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
    noisy = router.noise_weight_ED is not None and router.training
    noise_TE = torch.randn(T, E, dtype=dtype, device=x_TD.device) if noisy else None

    idx_rows, weight_rows, logit_rows, prob_rows, clean_rows, std_rows = [], [], [], [], [], []
    for t in range(T):
        x = x_TD[t]
        logits = torch.stack([router.weight_ED[e].to(dtype) @ x for e in range(E)])
        if router.bias_E is not None:
            logits = logits + router.bias_E.to(dtype)
        if noisy and router.noise_weight_ED is not None and noise_TE is not None:
            clean = logits
            std = torch.nn.functional.softplus(router.noise_weight_ED.to(dtype) @ x)
            logits = clean + noise_TE[t] * std
            clean_rows.append(clean)
            std_rows.append(std)
        if cfg.gating is Gating.SIGMOID_TOPK:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum()
        else:
            probs = torch.exp(logits - logits.max())
            probs = probs / probs.sum()
            scores = probs if cfg.gating is Gating.SOFTMAX_TOPK else logits

        choice = [float(v) for v in scores.detach()]
        if router.expert_bias_E is not None:
            choice = [c + float(b) for c, b in zip(choice, router.expert_bias_E, strict=True)]
        if cfg.num_groups > 1:
            size = E // cfg.num_groups
            groups = [choice[g * size : (g + 1) * size] for g in range(cfg.num_groups)]
            if cfg.group_score is GroupScore.MAX:
                group_scores = [max(g) for g in groups]
            else:
                group_scores = [sum(sorted(g, reverse=True)[:2]) for g in groups]
            kept = sorted(range(cfg.num_groups), key=lambda g: -group_scores[g])[: cfg.topk_groups]
            choice = [c if e // size in kept else -math.inf for e, c in enumerate(choice)]
        chosen = sorted(range(E), key=lambda e: -choice[e])[:K]

        weights = torch.stack([scores[e] for e in chosen])
        if cfg.gating is Gating.TOPK_SOFTMAX:
            weights = torch.exp(weights - weights.max())
            weights = weights / weights.sum()
        elif cfg.normalize_weights:
            weights = weights / weights.sum()
        weights = weights * cfg.routed_scaling_factor
        idx_rows.append(torch.tensor(chosen, device=x_TD.device))
        weight_rows.append(weights)
        logit_rows.append(logits)
        prob_rows.append(probs)

    return RoutingResult(
        expert_idx_TK=torch.stack(idx_rows),
        weights_TK=torch.stack(weight_rows),
        logits_TE=torch.stack(logit_rows),
        probs_TE=torch.stack(prob_rows),
        clean_logits_TE=torch.stack(clean_rows) if noisy else None,
        noise_std_TE=torch.stack(std_rows) if noisy else None,
    )
