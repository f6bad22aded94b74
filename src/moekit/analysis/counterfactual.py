"""Counterfactual routing: how much would a token's loss change if one MoE layer had sent it to
the next-best equal-cost set of experts? (after arXiv 2605.07260's counterfactual view of
routing decisions).

For each token-choice top-k layer, one at a time, every token's lowest-ranked chosen expert
(its k-th) is swapped for the router's (k+1)-th choice — the same number of experts, so the
same cost — with every other layer routing live, and the combine weights recomputed from the
live scores at the new set (``moekit.replay_routing`` with ``TokenRoutes``: ``-1`` routes the
other layers live). Per layer, over the tokens of the sample:

- ``mean_loss_change``: mean next-token loss with the swap minus without (nats; positive: the
  router's choice was better on average);
- ``better_fraction``: the share of tokens whose loss falls under the swap (a router that
  chose well has few; 0.5 means its k-th choice is a coin flip against the (k+1)-th);
- ``mean_gain_when_better``: their mean loss decrease.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.switches import moe_routers, replay_routing
from moekit.routing.engine_routes import TokenRoutes
from moekit.routing.topk import TopKRouter


def _token_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``(B, S-1)`` next-token cross-entropy of each position."""
    logits = model(tokens).logits[:, :-1]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(tokens.shape[0], -1)


@torch.no_grad()
def counterfactual_routing(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, Any]]:
    """The report of the module docstring, one entry per top-k MoE layer (in model order),
    on ``batches`` of token ids ``(B, S)`` (eval mode, no padding)."""
    routers = moe_routers(model)
    topk = [
        (r, name, router)
        for r, (name, router) in enumerate(routers)
        if isinstance(router, TopKRouter)
    ]
    if not topk:
        raise ValueError("the model has no token-choice top-k routers to swap")
    if len({router.top_k for _, _, router in topk}) > 1 or len(topk) != len(routers):
        raise ValueError("counterfactual routing needs top-k routers with one k in every layer")
    was_training = model.training
    model.eval()
    sums = {name: torch.zeros(3, dtype=torch.float64) for _, name, _ in topk}
    count = 0
    try:
        for tokens in batches:
            B, S = tokens.shape
            base = _token_losses(model, tokens)
            inputs: dict[int, torch.Tensor] = {}
            handles = [
                router.register_forward_pre_hook(
                    lambda _m, args, r=r, seen=inputs: seen.__setitem__(r, args[0].detach())
                )
                for r, _, router in topk
            ]
            try:
                model(tokens)
            finally:
                for h in handles:
                    h.remove()
            for r, name, router in topk:
                ranked = _ranked_choices(router, inputs[r])  # (T, k+1), best first
                swapped = torch.cat([ranked[:, : router.top_k - 1], ranked[:, -1:]], dim=1)
                ids = torch.full((B, S, len(routers), router.top_k), -1, dtype=torch.long)
                ids[:, :, r] = swapped.view(B, S, -1).cpu()
                with replay_routing(model, TokenRoutes(ids)):
                    change = _token_losses(model, tokens) - base
                better = change < 0
                sums[name] += torch.tensor(
                    [float(change.sum()), float(better.sum()), float(-change[better].sum())],
                    dtype=torch.float64,
                )
            count += base.numel()
    finally:
        model.train(was_training)
    report = []
    for _, name, _ in topk:
        total, better, gain = sums[name].tolist()
        report.append(
            {
                "layer": name,
                "mean_loss_change": total / max(count, 1),
                "better_fraction": better / max(count, 1),
                "mean_gain_when_better": gain / max(better, 1),
                "tokens": count,
            }
        )
    return report


def _ranked_choices(router: TopKRouter, x_TD: torch.Tensor) -> torch.Tensor:
    """The router's k+1 best experts per token, best first, by its own selection rule (bias,
    groups) on its live scores."""
    k = router.top_k
    if k + 1 > router.num_experts:
        raise ValueError(f"k={k} uses every expert; there is no next-best choice")
    router.top_k = k + 1
    try:
        return router._route(x_TD).expert_idx_TK
    finally:
        router.top_k = k
