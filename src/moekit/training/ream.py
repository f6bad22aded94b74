"""REAM: Router-weighted Expert Activation Merging (arXiv 2604.04356), beside REAP pruning.

REAP (``compress.prune(method='saliency')``) drops the experts with the lowest router-weighted
activation norm. REAM keeps the same experts as *centroids* and folds the others into them
instead of discarding them, layer by layer:

1. **Centroids**: the ``E - round(fraction · E)`` experts with the highest REAP saliency.
2. **Gated similarity** of two experts, on calibration tokens: the mean of (a) the cosine of
   their gate-weighted outputs ``p_e(x) f_e(x)`` over all tokens (every expert on every token)
   and (b) the cosine of their router-logit columns.
3. **Pseudo-pruning groups**: from the highest-saliency centroid down, each takes its up to
   ``group_size - 1`` most similar experts still unassigned; most groups stay singletons.
4. **Merge**: hidden units aligned to the centroid's (Hungarian assignment on the units'
   weights, as ``compress.merge_experts``), weights averaged by saliency, so the centroid
   dominates; the centroid's router row is kept.
5. **Sequential**: each layer is merged on the calibration activations the already-merged
   earlier layers produce.

What is not here: the paper's alignment cost also uses hidden-activation distances; moekit's
aligns on weights only.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F

from moekit.analysis.inspect import stream_with_hooks
from moekit.experts.bank import ExpertBank
from moekit.training.compress import LM, _moe_layers, merge_experts, saliency_scores


@torch.no_grad()
def gated_similarity(moe: Any, x_TD: torch.Tensor) -> torch.Tensor:
    """``(E, E)``: REAM's expert similarity on inputs ``x_TD`` (see the module)."""
    router = moe.router
    logits_TE = F.linear(x_TD.float(), router.weight_ED.float())
    if getattr(router, "bias_E", None) is not None:
        logits_TE = logits_TE + router.bias_E.float()
    probs_TE = torch.softmax(logits_TE, dim=-1)
    bank = cast(ExpertBank, moe.experts)
    outputs = torch.stack(
        [
            (bank.forward_one(e, x_TD).float() * probs_TE[:, e : e + 1]).reshape(-1)
            for e in range(bank.num_experts)
        ]
    )
    out_EO = F.normalize(outputs, dim=1)
    columns_ET = F.normalize(logits_TE.t(), dim=1)
    return (out_EO @ out_EO.t() + columns_ET @ columns_ET.t()) / 2


def ream_groups(
    saliency_E: torch.Tensor, similarity_EE: torch.Tensor, keep: int, group_size: int
) -> list[list[int]]:
    """Groups (centroid first) of one layer: the ``keep`` most salient experts as centroids,
    each taking, in order of saliency, its up to ``group_size - 1`` most similar unassigned
    experts; an expert left over (every group full) joins its most similar centroid."""
    E = len(saliency_E)
    centroids = saliency_E.topk(keep).indices.tolist()  # highest saliency first
    free = [e for e in range(E) if e not in centroids]
    groups = {c: [c] for c in centroids}
    for c in centroids:
        ranked = sorted(free, key=lambda e: -float(similarity_EE[c, e]))
        taken = ranked[: group_size - 1]
        groups[c] += taken
        free = [e for e in free if e not in taken]
    for e in free:
        nearest = max(centroids, key=lambda c: float(similarity_EE[c, e]))
        groups[nearest].append(e)
    return [groups[c] for c in sorted(centroids)]


def ream_merge(
    model: LM,
    batches: list[torch.Tensor],
    fraction: float,
    *,
    group_size: int | None = None,
) -> tuple[LM, dict[str, list[list[int]]]]:
    """Merge ``fraction`` of every MoE layer's experts REAM's way, layer by layer.

    Args:
        model: a decoder or encoder–decoder with token-choice top-k MoE layers.
        batches: calibration token ids.
        fraction: the share of each layer's experts to remove, in ``[0, 1)``.
        group_size: the largest group (centroid included); ``None``: twice the average,
            ``2 · ceil(E / keep)``.

    Returns:
        The merged model and, per layer, the groups (centroid first) in the source's numbering.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    names = [n for n, _ in _moe_layers(model)]
    plans: dict[str, list[list[int]]] = {}
    current = model
    for name in names:
        moe = dict(_moe_layers(current))[name]
        E = moe.num_experts
        keep = max(moe.top_k, E - round(fraction * E))
        size = group_size or 2 * math.ceil(E / keep)
        if size < math.ceil(E / keep):
            raise ValueError(
                f"group_size={size} cannot hold {E} experts in {keep} groups (at least "
                f"{math.ceil(E / keep)})"
            )
        inputs: list[torch.Tensor] = []

        def grab(_mod: Any, args: Any, _out: Any, inputs: list[torch.Tensor] = inputs) -> None:
            inputs.append(args[0].reshape(-1, args[0].shape[-1]))

        stream_with_hooks(current, batches, [(moe, grab)])
        x_TD = torch.cat(inputs)
        saliency = saliency_scores(current, batches)[name]
        groups = ream_groups(saliency, gated_similarity(moe, x_TD), keep, size)
        identity = {
            n: [[e] for e in range(m.num_experts)] for n, m in _moe_layers(current) if n != name
        }
        weights = {n: torch.ones(m.num_experts) for n, m in _moe_layers(current)}
        weights[name] = saliency.clamp(min=1e-9)
        current = merge_experts(current, {**identity, name: groups}, weights)
        plans[name] = groups
    return current, plans
