"""Growing an MoE mid-training: E experts become m·E (Expert Upcycling, Dwivedi et al. 2026,
arXiv 2604.19835), with the optimizer state carried over, so training resumes where it was.

The upcycling operator duplicates each expert ``m`` times (expert ``e`` becomes ``m·e …
m·e+m-1``) and extends the router with the copies' rows, top-k unchanged: the per-token cost
stays, the total parameters grow ``m``-fold. The copies start identical; small noise on the
copies' router rows (``noise``: a fraction of the row's standard deviation; the first copy of
each expert keeps its row exactly) breaks the tie so continued training can specialise them.
The paper names auxiliary-loss-free balancing as what keeps every copy trained; moekit's bias
balancing (``router.bias_balancing``) or an auxiliary loss does that job here.

The AdamW moments of every grown tensor (router rows and their bias/balancing state, expert
weights) are duplicated along the expert dimension like the tensors themselves; every other
tensor keeps its state; step counts, learning rates and the schedule carry over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch

from moekit.experts.bank import ExpertBank
from moekit.layers import MoE
from moekit.models.encoder_decoder.model import EncoderDecoderConfig
from moekit.models.transformer.model import TransformerLM
from moekit.training.compress import (
    LM,
    _copy_non_moe,
    _copy_sliced,
    _moe_layers,
    copy_layer_per_expert,
)


def _check_growable(name: str, moe: MoE, factor: int) -> None:
    if factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor}")
    if not isinstance(moe.experts, ExpertBank):
        raise ValueError(
            f"{name}: growing duplicates an ExpertBank's weights; this layer's experts are a "
            f"{type(moe.experts).__name__} (dequantise or consolidate first)"
        )
    if moe.zero_computation is not None:
        raise ValueError(f"{name}: growing a layer with zero-computation experts is not supported")


@torch.no_grad()
def grow_experts(
    model: LM, factor: int, *, noise: float = 0.01, seed: int = 0
) -> tuple[LM, dict[str, torch.Tensor]]:
    """A new model whose every MoE layer has ``factor`` times the experts (see the module).

    Args:
        model: a moekit decoder or encoder–decoder.
        factor: ``m``, copies of each expert.
        noise: standard deviation of the noise on the copies' router rows, relative to each
            row's own standard deviation (0: exact copies).
        seed: the noise's generator seed.

    Returns:
        The grown model and, per MoE layer name, the source expert of each new expert (the
        index that also maps the optimizer state: :func:`grow_optimizer_state`).
    """
    if isinstance(model.config, EncoderDecoderConfig):
        raise ValueError("growing an encoder–decoder is not supported yet (the decoder is)")
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers to grow")
    for name, moe in layers:
        _check_growable(name, moe, factor)
    new: LM = TransformerLM(grow_config(model.config, factor))
    new.train(model.training)
    new.to(next(model.parameters()).dtype)
    _copy_non_moe(model, new, [n for n, _ in layers])
    new_layers = dict(_moe_layers(new))
    generator = torch.Generator().manual_seed(seed)
    sources = {}
    for name, moe in layers:
        device = next(moe.parameters()).device
        source = torch.arange(moe.num_experts, device=device).repeat_interleave(factor)
        grown = new_layers[name]
        _copy_sliced(moe.router, grown.router, source)
        _copy_sliced(moe.experts, grown.experts, source)
        copy_layer_per_expert(moe, grown, source)
        weight = cast(Any, grown.router).weight_ED
        copies = (torch.arange(weight.shape[0]) % factor != 0).to(device)
        scale = weight.std(dim=1, keepdim=True) * noise
        draw = torch.randn(weight.shape, generator=generator).to(device, weight.dtype)
        weight.add_(draw * scale * copies.unsqueeze(1))
        sources[name] = source
    return new, sources


def grow_config(config: Any, factor: int) -> Any:
    """A decoder's ``TransformerConfig`` with ``factor`` times the experts in every MoE layer."""
    placement = config.moe
    counts = placement.experts_per_layer
    grown = dataclasses.replace(
        placement,
        layer=dataclasses.replace(
            placement.layer, num_experts=placement.layer.num_experts * factor
        ),
        experts_per_layer=None if counts is None else [c * factor for c in counts],
    )
    return dataclasses.replace(config, moe=grown)


@torch.no_grad()
def grow_optimizer_state(
    old_model: LM,
    old_optimizer: torch.optim.Optimizer,
    new_model: LM,
    new_optimizer: torch.optim.Optimizer,
    sources: dict[str, torch.Tensor],
) -> int:
    """Give ``new_optimizer`` (built on ``new_model``) the state of ``old_optimizer``: the
    moments of each grown tensor duplicated along the expert dimension with ``sources``, the
    others copied. Returns how many parameters received a state."""
    old_params = dict(old_model.named_parameters())
    grown_prefixes = {f"{name}.router.": s for name, s in sources.items()}
    grown_prefixes |= {f"{name}.experts.": s for name, s in sources.items()}
    carried = 0
    for name, new_param in new_model.named_parameters():
        old_param = old_params.get(name)
        if old_param is None or old_param not in old_optimizer.state:
            continue
        source = next((s for p, s in grown_prefixes.items() if name.startswith(p)), None)
        state = {}
        for key, value in old_optimizer.state[old_param].items():
            if (
                source is not None
                and isinstance(value, torch.Tensor)
                and value.shape == old_param.shape
                and value.dim() >= 1
                and new_param.shape[0] == source.numel()
            ):  # a moment of a grown tensor: duplicated like the tensor
                state[key] = value.index_select(0, source.to(value.device))
            else:
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        new_optimizer.state[new_param] = state
        carried += 1
    return carried
