"""Mamba2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", arXiv 2405.21060), as Nemotron-H, Granite-4.0-H and
other hybrids use it.

Legend: B = batch, S = positions, D = d_model, H = heads, P = head width, G = groups,
N = state width.

``[z | x B C | dt] = x W_in``; ``x B C`` through a short causal convolution and silu;
``dt = clamp(softplus(dt + dt_bias))``, ``A = -exp(A_log)``; per head the state-space recurrence
``h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T``, ``y_t = h_t^T C_t + D x_t``
(:mod:`moekit.models.mixers.recurrence` without the delta rule, ``B``/``C`` shared by the
``H / G`` heads of a group); ``out = RMSNorm_groups(y · silu(z)) W_out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.mixers import kernels
from moekit.models.mixers.base import (
    GatedRMSNorm,
    RecurrentMixer,
    RecurrentMixerConfig,
    time_step_bias,
)
from moekit.models.mixers.recurrence import (
    recurrence_loop,
    working_dtype,
)
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class Mamba2Config(RecurrentMixerConfig):
    """A Mamba2 token mixer.

    Args:
        n_heads: ``H``.
        head_dim: ``P`` (the inner width is ``H · P``).
        state_dim: ``N``.
        n_groups: ``G`` (``B`` and ``C`` per group; divides ``H``).
        conv_width: the short convolution's width over positions.
        conv_bias: the convolution has a bias.
        bias: the in/out projections have biases.
        dt_min, dt_max: the clamp of the time step (``dt_max = 0``: no upper limit).
        chunk: positions per chunk of the parallel training form.
    """

    kind: str = field(default="mamba2", init=False)
    n_heads: int = 8
    head_dim: int = 16
    state_dim: int = 16
    n_groups: int = 1
    conv_width: int = 4
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 0.0
    dt_max: float = 0.0
    chunk: int = 64

    def __post_init__(self) -> None:
        check_fields(self, f"{self.kind}.")
        for name in ("n_heads", "head_dim", "state_dim", "n_groups", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"mamba2.{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_width < 2:
            raise ValueError(f"mamba2.conv_width must be >= 2, got {self.conv_width}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"mamba2.n_groups={self.n_groups} must divide n_heads={self.n_heads}")

    @property
    def inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.n_groups * self.state_dim

    def build(self, *, d_model: int, norm_eps: float) -> Mamba2:
        return Mamba2(self, d_model=d_model, norm_eps=norm_eps)

    def state_shapes(self, batch: int, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (batch, self.conv_channels, self.conv_width - 1), (
            batch,
            self.n_heads,
            self.state_dim,
            self.head_dim,
        )

    def state_flops_per_token(self, d_model: int) -> int:
        """Decay, write and read-out of each head's ``(N, P)`` state: ``≈ 4 H N P``."""
        return 4 * self.n_heads * self.state_dim * self.head_dim


class Mamba2(RecurrentMixer):
    """``(B, S, D) -> (B, S, D)``; see the module docstring. ``use_loop`` runs the recurrence
    one position at a time (the reference)."""

    config: Mamba2Config

    def __init__(self, config: Mamba2Config, *, d_model: int, norm_eps: float) -> None:
        super().__init__()
        self.config, self.d_model = config, d_model
        c = config
        self.in_proj = nn.Linear(d_model, c.inner + c.conv_channels + c.n_heads, bias=c.bias)
        self.conv1d = nn.Conv1d(
            c.conv_channels, c.conv_channels, c.conv_width, groups=c.conv_channels, bias=c.conv_bias
        )
        self.dt_bias = nn.Parameter(time_step_bias(c.n_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, c.n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(c.n_heads))
        self.norm = GatedRMSNorm(
            c.inner, norm_eps, norm_before_gate=False, group_size=c.inner // c.n_groups
        )
        self.out_proj = nn.Linear(c.inner, d_model, bias=c.bias)
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
        z, xbc, dt = self.in_proj(x_BSD).split([c.inner, c.conv_channels, c.n_heads], dim=-1)
        conv_state, state = (None, None) if cache is None else cache
        xbc, new_conv_state = kernels.conv(
            xbc,
            self.conv1d.weight.squeeze(1),
            self.conv1d.bias,
            kernel=c.kernel,
            state_BCW=conv_state,
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
        )
        xbc = F.silu(xbc)
        if mask_BS is not None:
            xbc = xbc * mask_BS.unsqueeze(-1).to(xbc.dtype)
        x, b, cc = xbc.split([c.inner, c.n_groups * c.state_dim, c.n_groups * c.state_dim], -1)
        x = x.unflatten(-1, (c.n_heads, c.head_dim))
        per_group = c.n_heads // c.n_groups
        b = b.unflatten(-1, (c.n_groups, c.state_dim)).repeat_interleave(per_group, dim=2)
        cc = cc.unflatten(-1, (c.n_groups, c.state_dim)).repeat_interleave(per_group, dim=2)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))
        if c.dt_min > 0.0 or c.dt_max > 0.0:
            dt = dt.clamp(min=c.dt_min, max=c.dt_max if c.dt_max > 0.0 else None)
        A = -torch.exp(self.A_log.to(work))
        if self.use_loop or (cache is not None and S == 1):
            g, v = dt * A, x.to(work) * dt.unsqueeze(-1)
            options = dict(mask_BS=mask_BS, segment_ids_BS=segment_ids_BS)
            y, new_state = recurrence_loop(cc, b, v, g, initial_state_BHKV=state, **options)
        else:
            y, new_state = kernels.mamba_scan(
                x,
                dt,
                A,
                b,
                cc,
                kernel=c.kernel,
                chunk=c.chunk,
                initial_state_BHNP=state,
                mask_BS=mask_BS,
                segment_ids_BS=segment_ids_BS,
            )
        if cache is not None:
            cache[0].copy_(new_conv_state)
            cache[1].copy_(new_state)
        y = y + x.to(work) * self.D.to(work)[:, None]
        y = self.norm(y.flatten(-2).to(x_BSD.dtype), z)
        return self.out_proj(y.to(x_BSD.dtype))
