"""Block swap: run a live ``transformers`` MoE model on moekit's MoE layers.

``swap_moe_blocks(hf_model)`` converts the model's weights once, then replaces every sparse MoE
block (``model.layers[i].mlp``) with a :class:`MoEBlock` holding the equivalent moekit ``MoE``
(same weights, same outputs), so the rest of the HF model — attention, caches, generation,
``Trainer`` — stays as it is while the experts run on moekit's dispatch. The auxiliary loss of
each call is on ``block.last_output.aux_loss`` (or use ``moekit.collect_moe_outputs(model)``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from moekit.interop.hf import from_hf
from moekit.layers import MoE, MoEOutput


class MoEBlock(nn.Module):
    """An HF-compatible MoE block: ``hidden_states (B, S, D) -> (B, S, D)``, or, for families
    whose decoder layer expects them (GPT-OSS), ``(output, router_scores (B*S, E))``."""

    def __init__(self, moe: MoE, return_router_scores: bool = False) -> None:
        super().__init__()
        self.moe = moe
        self.return_router_scores = return_router_scores
        self.last_output: MoEOutput | None = None

    def forward(self, hidden_states: torch.Tensor):
        out = self.moe(hidden_states)
        self.last_output = out
        if not self.return_router_scores:
            return out.output
        routing = out.routing
        scores = torch.zeros_like(routing.logits_TE).scatter(
            1, routing.expert_idx_TK, routing.weights_TK
        )
        return out.output, scores


def swap_moe_blocks(hf_model: nn.Module) -> nn.Module:
    """Replace every HF sparse MoE block in ``hf_model`` (in place) and return it."""

    converted = from_hf(hf_model)
    if not hasattr(converted, "blocks"):
        raise ValueError("block swapping replaces the MoE blocks of decoder-only models")
    hf: Any = hf_model  # a transformers model: attributes beyond nn.Module
    layers = hf.model.layers
    with_scores = hf.config.model_type == "gpt_oss"
    swapped = 0
    for i, block in enumerate(cast(Any, converted).blocks):
        ffn = cast(Any, block).ffn
        if isinstance(ffn, MoE):
            dtype = next(layers[i].parameters()).dtype
            layers[i].mlp = MoEBlock(ffn, return_router_scores=with_scores).to(dtype)
            swapped += 1
    if not swapped:
        raise ValueError("the model has no MoE blocks to swap")
    return hf_model
