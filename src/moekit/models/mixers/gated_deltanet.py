"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv 2412.06464), as Qwen3-Next and Qwen3.5/3.6-MoE use it between their
attention layers.

Legend: B = batch, S = positions, D = d_model, Hk / Hv = key / value heads, K / V = their widths.

``[q | k | v | z] = x W_qkvz`` and ``[b | a] = x W_ba``; ``q | k | v`` through a short causal
convolution and silu; ``q, k`` L2-normalised per head (``q`` also scaled by ``K^-1/2``); per
value head a step ``β = sigmoid(b)`` and a log decay ``g = -exp(A_log) · softplus(a +
dt_bias)``; the gated delta rule (:mod:`moekit.models.mixers.recurrence`) gives ``o``;
``y = (RMSNorm(o) · w · silu(z)) W_out``.
With ``Hv > Hk`` each key head serves ``Hv / Hk`` consecutive value heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.mixers import kernels
from moekit.models.mixers.base import (
    GatedRMSNorm,
    RecurrentMixer,
    RecurrentMixerConfig,
    l2_normalize,
)
from moekit.models.mixers.recurrence import (
    recurrence_loop,
    working_dtype,
)
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class GatedDeltaNetConfig(RecurrentMixerConfig):
    """A Gated DeltaNet token mixer.

    Args:
        n_key_heads: query/key heads ``Hk``.
        n_value_heads: value heads ``Hv`` (a multiple of ``Hk``).
        key_head_dim: ``K``.
        value_head_dim: ``V``.
        conv_width: the short causal convolution's width over positions.
        chunk: positions per chunk of the parallel training form.
    """

    kind: str = field(default="gated_deltanet", init=False)
    n_key_heads: int = 4
    n_value_heads: int = 4
    key_head_dim: int = 32
    value_head_dim: int = 32
    conv_width: int = 4
    chunk: int = 64

    def __post_init__(self) -> None:
        check_fields(self, f"{self.kind}.")
        for name in ("n_key_heads", "n_value_heads", "key_head_dim", "value_head_dim", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"gated_deltanet.{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_width < 2:
            raise ValueError(f"gated_deltanet.conv_width must be >= 2, got {self.conv_width}")
        if self.n_value_heads % self.n_key_heads:
            raise ValueError(
                f"gated_deltanet.n_value_heads={self.n_value_heads} must be a multiple of "
                f"n_key_heads={self.n_key_heads}"
            )

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_key_heads * self.key_head_dim + self.n_value_heads * self.value_head_dim

    def build(self, *, d_model: int, norm_eps: float) -> GatedDeltaNet:
        return GatedDeltaNet(self, d_model=d_model, norm_eps=norm_eps)

    def state_shapes(self, batch: int, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (batch, self.conv_channels, self.conv_width - 1), (
            batch,
            self.n_value_heads,
            self.key_head_dim,
            self.value_head_dim,
        )

    def state_flops_per_token(self, d_model: int) -> int:
        """Decay, prediction, update and read-out of each head's ``(K, V)`` state:
        ``≈ 6 Hv K V``."""
        return 6 * self.n_value_heads * self.key_head_dim * self.value_head_dim


class GatedDeltaNet(RecurrentMixer):
    """``(B, S, D) -> (B, S, D)``; see the module docstring. ``use_loop`` runs the recurrence
    one position at a time (the reference) instead of in chunks."""

    config: GatedDeltaNetConfig

    def __init__(self, config: GatedDeltaNetConfig, *, d_model: int, norm_eps: float) -> None:
        super().__init__()
        self.config, self.d_model = config, d_model
        c = config
        self.key_dim = c.n_key_heads * c.key_head_dim
        self.value_dim = c.n_value_heads * c.value_head_dim
        # rows [q | k | v | z] (heads major within each) and [b | a]
        self.in_proj_qkvz = nn.Linear(d_model, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d_model, 2 * c.n_value_heads, bias=False)
        channels = c.conv_channels
        self.conv1d = nn.Conv1d(channels, channels, c.conv_width, groups=channels, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(c.n_value_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(c.n_value_heads).uniform_(1.0, 16.0)))
        self.norm = GatedRMSNorm(c.value_head_dim, norm_eps, norm_before_gate=True)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.use_loop = False

    def forward(
        self,
        x_BSD: torch.Tensor,
        *,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_BS: torch.Tensor | None = None,
        segment_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.config
        S = x_BSD.shape[1]
        work = working_dtype(x_BSD)
        if mask_BS is not None:
            x_BSD = x_BSD * mask_BS.unsqueeze(-1).to(x_BSD.dtype)
        conv_state, state = (None, None) if cache is None else cache
        qkv, z = self.in_proj_qkvz(x_BSD).split(
            [self.key_dim * 2 + self.value_dim, self.value_dim], -1
        )
        b, a = self.in_proj_ba(x_BSD).chunk(2, dim=-1)
        qkv, new_conv_state = kernels.conv(
            qkv,
            self.conv1d.weight.squeeze(1),
            kernel=c.kernel,
            state_BCW=conv_state,
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
        )
        qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.unflatten(-1, (c.n_key_heads, c.key_head_dim)).to(work)
        k = k.unflatten(-1, (c.n_key_heads, c.key_head_dim)).to(work)
        v = v.unflatten(-1, (c.n_value_heads, c.value_head_dim))
        q = l2_normalize(q) * (1.0 / math.sqrt(c.key_head_dim))
        k = l2_normalize(k)
        repeat = c.n_value_heads // c.n_key_heads
        if repeat > 1:
            q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
        beta = b.to(work).sigmoid()
        g = -self.A_log.to(work).exp() * F.softplus(a.to(work) + self.dt_bias)
        run = recurrence_loop if self.use_loop or (cache is not None and S == 1) else None
        options = dict(initial_state_BHKV=state, mask_BS=mask_BS, segment_ids_BS=segment_ids_BS)
        if run is None:
            o, new_state = kernels.gated_delta_rule(
                q, k, v, g, beta, kernel=c.kernel, chunk=c.chunk, **options
            )
        else:
            o, new_state = run(q, k, v, g, beta, **options)
        if cache is not None:
            cache[0].copy_(new_conv_state)
            cache[1].copy_(new_state)
        z = z.unflatten(-1, (c.n_value_heads, c.value_head_dim))
        y = self.norm(o.to(x_BSD.dtype), z).flatten(-2)
        return self.out_proj(y)
