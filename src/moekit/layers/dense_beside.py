"""A dense FFN running beside the MoE layer, each branch with its own norms (Gemma 4).

Legend: B = batch, S = positions, D = d_model.

For the block's input ``x`` (the residual stream, not normalised)::

    y = post_dense(FFN(pre_dense(x))) + post_moe(MoE(pre_moe(x), routed on x))

The MoE's router reads ``x`` itself (Gemma 4's router has its own RMS norm and scale:
``TopKRouterConfig.input_norm``), its experts the normalised copy. The block adds its own norm
after the sum (``NormPosition.SANDWICH``). This channel mixer normalises its own input, so its
block has no pre-norm for it (``normalizes_input``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from moekit.experts.activations import Activation
from moekit.experts.dense import FeedForward
from moekit.layers.moe import MoE, MoEOutput


class DenseBesideMoE(nn.Module):
    """``(B, S, D) -> MoEOutput`` whose ``output`` is the sum of both branches; see the module
    docstring. Parameters: ``dense`` (a ``FeedForward``), ``moe`` (an ``MoE``) and four RMS
    norms ``dense_norm``, ``dense_out_norm``, ``moe_norm``, ``moe_out_norm``."""

    #: the block gives this channel mixer the residual stream, not a normalised copy
    normalizes_input: ClassVar[bool] = True

    def __init__(
        self,
        moe: MoE,
        *,
        d_model: int,
        ffn_hidden: int,
        activation: Activation,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.dense = FeedForward(d_model, ffn_hidden, activation=activation)
        self.moe = moe
        self.dense_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.dense_out_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.moe_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.moe_out_norm = nn.RMSNorm(d_model, eps=norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> MoEOutput:
        dense = self.dense_out_norm(self.dense(self.dense_norm(x_BSD)))
        routed = self.moe(self.moe_norm(x_BSD), padding_mask, token_ids, route_on=x_BSD)
        y = dense + self.moe_out_norm(routed.output)
        return dataclasses.replace(routed, output=y)
