"""Shrinking an MoE model: prune experts, or merge similar experts, into a new model.

Scores, on calibration batches of token ids:

- ``frequency``: tokens routed to each expert (an expert nobody picks can go);
- ``saliency``: REAP's router-weighted expert activation (Lasby et al. 2025, "REAP the Experts:
  Why Pruning Prevails for One-Shot MoE compression"): the mean over the tokens routed to an
  expert of ``gate weight × ‖expert output‖``.

Pruning keeps the best-scoring experts per layer (``scope='layer'``) or over all layers
(``'global'``), removing the others' router rows (with their biases and balancing state) and
weights. Merging folds each dropped expert into its most similar kept expert (cosine similarity
of router rows): hidden units are first aligned to the kept expert's by a permutation
(``scipy.optimize.linear_sum_assignment`` on the units' weight vectors), then the weights are
averaged, weighted by routing frequency; the merged expert keeps the kept expert's router row.
Layers may end with different expert counts (``MoEPlacementConfig.experts_per_layer``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from moekit.analysis.inspect import count_routing, stream_with_hooks
from moekit.experts.bank import ExpertBank
from moekit.layers import MoE
from moekit.models.encoder_decoder.model import EncoderDecoderConfig, EncoderDecoderLM
from moekit.models.transformer.model import TransformerLM
from moekit.routing.sparsemixer import SparseMixerRouter
from moekit.routing.topk import TopKRouter

#: the models pruning and merging rebuild
LM = TransformerLM | EncoderDecoderLM


def _moe_layers(model: LM) -> list[tuple[str, MoE]]:
    if not isinstance(model, TransformerLM | EncoderDecoderLM):
        raise ValueError(
            f"pruning and merging rebuild TransformerLM and EncoderDecoderLM models, not "
            f"{type(model).__name__}"
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("the model has no MoE layers")
    for name, moe in layers:
        if not isinstance(moe.router, TopKRouter | SparseMixerRouter) or not isinstance(
            moe.experts, ExpertBank
        ):
            raise ValueError(
                f"{name}: pruning and merging need a token-choice top-k router and an expert "
                f"bank, not {type(moe.router).__name__}/{type(moe.experts).__name__}"
            )
        if moe.experts.adapter is not None:
            raise ValueError(f"{name} has LoRA adapters: merge them first (merge_lora)")
    return layers


@torch.no_grad()
def saliency_scores(model: LM, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{MoE layer: (E,) mean of gate weight × ‖expert output‖ over the tokens routed to each
    expert}`` (0 for an expert no token reaches)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def scorer(name: str) -> Any:
        def hook(mod: Any, inputs: Any, output: Any) -> None:
            x_TD = inputs[0].reshape(-1, inputs[0].shape[-1])
            idx_TK, w_TK = output.routing.expert_idx_TK, output.routing.weights_TK
            bank = cast(ExpertBank, mod.experts)
            total = sums.setdefault(name, torch.zeros(bank.num_experts, dtype=torch.float64))
            seen = counts.setdefault(name, torch.zeros(bank.num_experts, dtype=torch.float64))
            for e in range(bank.num_experts):  # a loop over experts, not tokens
                rows, slots = (idx_TK == e).nonzero(as_tuple=True)
                if len(rows):
                    norms = bank.forward_one(e, x_TD[rows]).norm(dim=-1)
                    total[e] += float((w_TK[rows, slots] * norms).sum())
                    seen[e] += len(rows)

        return hook

    stream_with_hooks(model, batches, [(moe, scorer(n)) for n, moe in _moe_layers(model)])
    return {n: sums[n] / counts[n].clamp(min=1) for n in sums}


def expert_scores(
    model: LM, batches: Iterable[torch.Tensor], method: str
) -> dict[str, torch.Tensor]:
    if method == "frequency":
        return {n: c.double() for n, c in count_routing(model, batches).items()}
    if method == "saliency":
        return saliency_scores(model, batches)
    raise ValueError(f"method must be 'frequency' or 'saliency', got {method!r}")


def choose_kept(
    scores: dict[str, torch.Tensor], fraction: float, top_k: int, scope: str = "layer"
) -> dict[str, list[int]]:
    """The experts to keep when removing ``fraction`` of them (per layer or globally by score);
    every layer keeps at least ``top_k``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "layer":
        per_layer = {}
        for name, s in scores.items():
            n = max(top_k, len(s) - round(fraction * len(s)))
            per_layer[name] = sorted(s.topk(n).indices.tolist())
        return per_layer
    everything = [(float(v), name, e) for name, s in scores.items() for e, v in enumerate(s)]
    drop = round(fraction * len(everything))
    kept = {name: set(range(len(s))) for name, s in scores.items()}
    for _, name, e in sorted(everything):  # lowest scores first, over all layers
        if drop == 0:
            break
        if len(kept[name]) > top_k:
            kept[name].discard(e)
            drop -= 1
    return {name: sorted(v) for name, v in kept.items()}


def _rebuilt(model: LM, counts: list[int]) -> LM:
    """The model with ``counts`` routed experts in its MoE layers (in module order: an
    encoder–decoder's encoder layers, then its decoder layers)."""
    config = model.config
    new: LM
    if isinstance(config, EncoderDecoderConfig):
        n_enc = len(config.encoder_moe.moe_layer_indices(config.n_encoder_layers))
        if config.encoder_moe.layer is None:
            n_enc = 0
        stacks = {}
        for name, part in (("encoder_moe", counts[:n_enc]), ("decoder_moe", counts[n_enc:])):
            placement = getattr(config, name)
            if placement.layer is not None:
                stacks[name] = dataclasses.replace(placement, experts_per_layer=part)
        new = EncoderDecoderLM(dataclasses.replace(config, **stacks))
    else:
        placement = dataclasses.replace(config.moe, experts_per_layer=counts)
        new = TransformerLM(dataclasses.replace(config, moe=placement))
    new.train(model.training)  # the source's mode (eval: no jitter, no sampled routing)
    return new.to(next(model.parameters()).dtype)


#: an MoE layer's own per-expert tensors (besides its router's and its bank's)
LAYER_PER_EXPERT = ("expert_scale_E",)


def _copy_non_moe(model: LM, new: LM, moe_names: list[str]) -> None:
    prefixes = (
        tuple(f"{n}.router." for n in moe_names)
        + tuple(f"{n}.experts." for n in moe_names)
        + tuple(f"{n}.{t}" for n in moe_names for t in LAYER_PER_EXPERT)
    )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    missing = new.load_state_dict(state, strict=False)
    left = [k for k in missing.missing_keys if not k.startswith(prefixes)]
    if left or missing.unexpected_keys:
        raise ValueError(f"could not carry over {left or missing.unexpected_keys}")


@torch.no_grad()
def prune_experts(model: LM, kept: dict[str, list[int]]) -> LM:
    """A new model with only the ``kept`` experts of each MoE layer (router rows, biases,
    balancing state and expert weights sliced; everything else copied)."""
    layers = _moe_layers(model)
    for name, moe in layers:
        keep = kept.get(name)
        if not keep:
            raise ValueError(f"{name}: cannot remove every expert of a layer")
        if len(keep) < moe.top_k or max(keep) >= moe.num_experts or min(keep) < 0:
            raise ValueError(
                f"{name}: keep {keep} must name >= top_k={moe.top_k} experts in "
                f"[0, {moe.num_experts})"
            )
    new = _rebuilt(model, [len(kept[name]) for name, _ in layers])
    _copy_non_moe(model, new, [n for n, _ in layers])
    new_layers = dict(_moe_layers(new))
    for name, moe in layers:
        index = torch.tensor(kept[name], device=next(moe.parameters()).device)
        _copy_sliced(moe.router, new_layers[name].router, index)
        _copy_sliced(moe.experts, new_layers[name].experts, index)
        copy_layer_per_expert(moe, new_layers[name], index)
    return new


def copy_layer_per_expert(source: nn.Module, target: nn.Module, index: torch.Tensor) -> None:
    """Rows ``index`` of an MoE layer's own per-expert tensors (``expert_scale_E``)."""
    for name in LAYER_PER_EXPERT:
        value = getattr(source, name, None)
        if value is not None:
            getattr(target, name).copy_(value.index_select(0, index))


def _copy_sliced(source: nn.Module, target: nn.Module, index: torch.Tensor) -> None:
    """Copy every parameter/buffer, taking rows ``index`` of those with an expert dimension."""
    E = int(cast(Any, source).num_experts)
    target_state = target.state_dict()
    for key, value in source.state_dict().items():
        sliced = value.index_select(0, index) if value.dim() >= 1 and value.shape[0] == E else value
        target_state[key].copy_(sliced)


def prune(
    model: LM,
    batches: list[torch.Tensor],
    fraction: float,
    *,
    method: str = "frequency",
    scope: str = "layer",
) -> tuple[LM, dict[str, list[int]]]:
    """Score on ``batches``, remove ``fraction`` of the experts, return the new model and the
    kept experts per layer."""
    layers = _moe_layers(model)
    top_k = max(m.top_k for _, m in layers)
    scores = expert_scores(model, batches, method)
    configs: dict[str, Any] = {name: m.router.config for name, m in layers}
    if any(getattr(c, "num_groups", 1) > 1 for c in configs.values()):
        if scope != "layer":  # group-limited routing: prune inside each group
            raise ValueError("group-limited routers are pruned per layer (scope='layer')")
        kept = {
            name: _kept_per_group(
                s, fraction, top_k, configs[name].num_groups, configs[name].topk_groups
            )
            for name, s in scores.items()
        }
    else:
        kept = choose_kept(scores, fraction, top_k, scope)
    return prune_experts(model, kept), kept


def _kept_per_group(
    scores_E: torch.Tensor, fraction: float, top_k: int, num_groups: int, topk_groups: int
) -> list[int]:
    """The best experts of every group, the same number in each (group-limited routing keeps
    its groups: expert ``e`` stays in group ``e // (E / G)``), enough that the ``topk_groups``
    chosen groups still hold ``top_k`` experts."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    E = len(scores_E)
    size = E // num_groups
    per_group = max(1, size - round(fraction * size), -(-top_k // topk_groups))
    kept: list[int] = []
    for g in range(num_groups):
        best = scores_E[g * size : (g + 1) * size].topk(per_group).indices + g * size
        kept += best.tolist()
    return sorted(kept)


def _unit_vectors(bank: ExpertBank, e: int) -> torch.Tensor:
    """``(H, ·)``: each hidden unit's weights (gate and up columns, output row)."""
    H = bank.hidden
    w_in = bank.w_in_EDH[e]
    columns = [w_in[:, :H].T, w_in[:, H:].T] if w_in.shape[1] == 2 * H else [w_in.T]
    return torch.cat([*columns, bank.w_out_EHD[e]], dim=1)


def _permuted(bank: ExpertBank, e: int, order: torch.Tensor) -> dict[str, torch.Tensor]:
    """Expert ``e``'s weights with hidden units in ``order``."""
    H = bank.hidden
    w_in = bank.w_in_EDH[e]
    if w_in.shape[1] == 2 * H:
        w_in = torch.cat([w_in[:, :H][:, order], w_in[:, H:][:, order]], dim=1)
    else:
        w_in = w_in[:, order]
    out = {"w_in_EDH": w_in, "w_out_EHD": bank.w_out_EHD[e][order]}
    if bank.b_in_EH is not None and bank.b_out_ED is not None:
        b_in = bank.b_in_EH[e]
        b_in = torch.cat([b_in[:H][order], b_in[H:][order]]) if len(b_in) == 2 * H else b_in[order]
        out["b_in_EH"], out["b_out_ED"] = b_in, bank.b_out_ED[e]
    return out


@torch.no_grad()
def merge_experts(
    model: LM, groups: dict[str, list[list[int]]], frequencies: dict[str, torch.Tensor]
) -> LM:
    """A new model in which each group of experts (per layer; the first member is the anchor
    whose router row the merged expert keeps) becomes one expert: hidden units aligned to the
    anchor's, weights averaged by routing frequency."""
    try:
        from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (optional: scipy)
    except ImportError:
        raise ImportError("merging needs scipy: pip install 'moekit[routing]'") from None
    layers = _moe_layers(model)
    anchors = {name: [g[0] for g in groups[name]] for name, _ in layers}
    new = prune_experts(model, {n: sorted(a) for n, a in anchors.items()})
    new_layers = dict(_moe_layers(new))
    for name, moe in layers:
        bank = cast(ExpertBank, moe.experts)
        target = cast(ExpertBank, new_layers[name].experts)
        position = {e: i for i, e in enumerate(sorted(anchors[name]))}
        for group in groups[name]:
            anchor = group[0]
            weights = frequencies[name][group].double().clamp(min=1e-9)
            weights = (weights / weights.sum()).to(bank.w_in_EDH.dtype)
            reference = _unit_vectors(bank, anchor)
            merged: dict[str, torch.Tensor] = {}
            for w, e in zip(weights, group, strict=True):
                similarity = (reference @ _unit_vectors(bank, e).T).double().cpu().numpy()
                _, order = linear_sum_assignment(-similarity)
                order_t = torch.as_tensor(order, device=bank.w_in_EDH.device)
                for key, value in _permuted(bank, e, order_t).items():
                    merged[key] = merged.get(key, 0) + w * value
            for key, value in merged.items():
                getattr(target, key)[position[anchor]].copy_(value)
    return new


def plan_merges(
    model: LM, frequencies: dict[str, torch.Tensor], fraction: float
) -> dict[str, list[list[int]]]:
    """Per layer, fold the least-routed experts (``fraction`` of them) into the kept expert
    with the most similar router row (cosine); returns groups, anchor first."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    plans = {}
    for name, moe in _moe_layers(model):
        E = moe.num_experts
        num_groups = int(getattr(moe.router.config, "num_groups", 1))
        if num_groups > 1:  # group-limited routing: merge inside each group, evenly
            topk_groups = int(cast(Any, moe.router).config.topk_groups)
            kept = _kept_per_group(frequencies[name], fraction, moe.top_k, num_groups, topk_groups)
        else:
            keep = max(moe.top_k, E - round(fraction * E))
            kept = sorted(frequencies[name].topk(keep).indices.tolist())
        rows = torch.nn.functional.normalize(
            cast(TopKRouter, moe.router).weight_ED.detach().float(), dim=1
        )
        size = E // num_groups
        groups = {e: [e] for e in kept}
        for e in range(E):
            if e not in groups:
                same_group = [k for k in kept if k // size == e // size]
                nearest = max(same_group, key=lambda k: float(rows[e] @ rows[k]))
                groups[nearest].append(e)
        plans[name] = [groups[e] for e in kept]
    return plans


def merge(
    model: LM, batches: list[torch.Tensor], fraction: float
) -> tuple[LM, dict[str, list[list[int]]]]:
    """Merge ``fraction`` of each layer's experts into their nearest kept experts."""
    frequencies = {n: c.double() for n, c in count_routing(model, batches).items()}
    groups = plan_merges(model, frequencies, fraction)
    return merge_experts(model, groups, frequencies), groups
