"""A dense FFN running beside the MoE layer, each branch with its own norms (Gemma 4).

Legend: B = batch, S = positions, D = d_model.

For the block's input ``x`` (the residual stream, not normalised)::

    y = post_dense(FFN(pre_dense(x))) + post_moe(MoE(pre_moe(x), routed on x))

The MoE's router reads ``router_norm(x) · D^-0.5`` (an RMS norm with its own learned scale:
Gemma 4's router input), its experts the normalised copy ``pre_moe(x)``. The block adds its own norm
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
    docstring. Parameters: ``dense`` (a ``FeedForward``), ``moe`` (an ``MoE``) and five RMS
    norms ``dense_norm``, ``dense_out_norm``, ``moe_norm``, ``moe_out_norm`` and
    ``router_norm``."""

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
        self.router_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.router_scale = d_model**-0.5

    def forward(
        self,
        x_BSD: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> MoEOutput:
        dense = self.dense_out_norm(self.dense(self.dense_norm(x_BSD)))
        route_on = self.router_norm(x_BSD) * self.router_scale
        routed = self.moe(self.moe_norm(x_BSD), padding_mask, token_ids, route_on=route_on)
        y = dense + self.moe_out_norm(routed.output)
        return dataclasses.replace(routed, output=y)
