"""Quantise a model's routed experts in place (``moekit quantize``).

Only the routed experts' two stacked weights are quantised (they are nearly all of an MoE's
bytes); attention, embeddings, routers, shared experts, dense FFNs and biases stay as they are.
The model's config records the format (``moe.layer.experts.quantization``), so
``save_pretrained``/``from_pretrained`` round-trip the quantised model and every command that
loads a checkpoint (``eval``, ``generate``, ``inspect``, ``finetune``) runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from torch import nn

from moekit.experts.bank import ExpertBank
from moekit.experts.quantized import QuantizationConfig, QuantizedExpertBank
from moekit.layers import moe_layers


def quantize_experts(model: nn.Module, quantization: QuantizationConfig) -> nn.Module:
    """Replace every MoE layer's ``ExpertBank`` of ``model`` with a ``QuantizedExpertBank`` (in
    place) and record ``quantization`` in ``model.config``; returns ``model``.

    Raises when the model has no MoE layer, is already quantised, carries LoRA adapters (merge
    or drop them first: they would be quantised into the experts or lost), or when the group
    size does not divide a projection's input width (names both).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer to quantise")
    for layer in layers:
        if isinstance(layer.experts, QuantizedExpertBank):
            raise ValueError("the model's experts are already quantised")
        if not isinstance(layer.experts, ExpertBank):
            raise ValueError(
                f"only ExpertBank experts can be quantised, got {type(layer.experts).__name__}"
            )
        if layer.experts.adapter is not None:
            raise ValueError(
                "the experts carry LoRA adapters: merge and remove them first "
                "(moekit.adapters.lora.remove_lora; `moekit quantize` does) or quantise the base "
                "model and attach adapters afterwards (QLoRA)"
            )
    for layer in layers:  # validate every width before changing anything
        bank = cast(ExpertBank, layer.experts)
        quantization.check_width(bank.d_model, "d_model")
        quantization.check_width(bank.hidden, "experts.hidden")
    for layer in layers:
        layer.experts = QuantizedExpertBank.quantize(layer.experts, quantization)
    config = getattr(model, "config", None)
    if config is not None:
        model.config = _with_quantization(config, quantization)
    return model


def _with_quantization(config: Any, quantization: QuantizationConfig) -> Any:
    """``config`` whose MoE layer's expert config records ``quantization``."""
    placement = config.moe
    layer = placement.layer
    experts = dataclasses.replace(layer.experts, quantization=quantization)
    placement = dataclasses.replace(placement, layer=dataclasses.replace(layer, experts=experts))
    return dataclasses.replace(config, moe=placement)


def expert_weight_bytes(model: nn.Module) -> int:
    """Bytes the routed experts' stacked weights take (codes and scales when quantised)."""
    total = 0
    for layer in moe_layers(model):
        bank = layer.experts
        if isinstance(bank, QuantizedExpertBank):
            total += bank.weight_bytes
        elif isinstance(bank, ExpertBank):
            total += sum(w.numel() * w.element_size() for w in (bank.w_in_EDH, bank.w_out_EHD))
    return total
