"""Gated short convolution (LFM2, Liquid AI 2025): ``y = (C ⊙ conv(B ⊙ x)) W_out`` with
``[B | C | x] = x W_in`` and a short causal depthwise convolution over positions: a token mixer
whose decoding state is the last ``width - 1`` inputs.

Legend: B = batch, S = positions, D = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from moekit.models.mixers import kernels
from moekit.models.mixers.base import RecurrentMixer, RecurrentMixerConfig
from moekit.models.mixers.conv import causal_conv_loop
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class ShortConvConfig(RecurrentMixerConfig):
    """A gated short-convolution token mixer.

    Args:
        conv_width: the convolution's width over positions (LFM2's ``conv_L_cache``).
        bias: biases on the projections and the convolution.
    """

    kind: str = field(default="short_conv", init=False)
    conv_width: int = 3
    bias: bool = False

    def __post_init__(self) -> None:
        check_fields(self, f"{self.kind}.")
        if self.conv_width < 2:
            raise ValueError(f"short_conv.conv_width must be >= 2, got {self.conv_width}")

    def build(self, *, d_model: int, norm_eps: float) -> ShortConv:
        return ShortConv(self, d_model=d_model)

    def state_shapes(self, batch: int, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (batch, d_model, self.conv_width - 1), (batch, 0)


class ShortConv(RecurrentMixer):
    """``(B, S, D) -> (B, S, D)``; see the module docstring."""

    config: ShortConvConfig

    def __init__(self, config: ShortConvConfig, *, d_model: int) -> None:
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=config.bias)
        self.conv = nn.Conv1d(d_model, d_model, config.conv_width, groups=d_model, bias=config.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.use_loop = False

    def forward(
        self,
        x_BSD: torch.Tensor,
        *,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_BS: torch.Tensor | None = None,
        segment_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask_BS is not None:
            x_BSD = x_BSD * mask_BS.unsqueeze(-1).to(x_BSD.dtype)
        b, c, x = self.in_proj(x_BSD).chunk(3, dim=-1)
        conv = partial(kernels.conv, kernel=self.config.kernel)
        y, new_state = (causal_conv_loop if self.use_loop else conv)(
            b * x,
            self.conv.weight.squeeze(1),
            self.conv.bias,
            state_BCW=None if cache is None else cache[0],
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
        )
        if cache is not None:
            cache[0].copy_(new_state)
        return self.out_proj(c * y)
