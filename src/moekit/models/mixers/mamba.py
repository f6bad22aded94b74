"""The first Mamba (Gu & Dao 2023, arXiv 2312.00752) as Jamba (Lieber et al. 2024, arXiv
2403.19887) uses it: a selective state space whose decay is per channel and per state element.

Legend: B = batch, S = positions, D = d_model, I = inner width (``expand · D``), N = state
width, R = the time step's rank.

``[x | z] = h W_in``; ``x`` through a short causal convolution and silu;
``[δ | B | C] = x W_x`` (Jamba normalises each with an RMSNorm: ``inner_norms``);
``Δ = softplus(δ W_dt + b_dt)`` ``(B, S, I)``, ``A = -exp(A_log)`` ``(I, N)``; the selective
scan (:mod:`moekit.models.mixers.selective_scan`) gives ``y``; ``out = ((y + D x) · silu(z))
W_out``. Parameter names follow ``transformers``' Jamba.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.mixers import kernels
from moekit.models.mixers.base import RecurrentMixer, RecurrentMixerConfig, time_step_bias
from moekit.models.mixers.recurrence import working_dtype
from moekit.models.mixers.selective_scan import selective_scan_chunked, selective_scan_loop
from moekit.utils.validation import check_fields


@dataclass(kw_only=True)
class MambaConfig(RecurrentMixerConfig):
    """A Mamba (selective scan) token mixer.

    Args:
        expand: the inner width is ``expand · d_model``.
        state_dim: ``N``.
        conv_width: the short convolution's width over positions.
        dt_rank: ``R``, the time step's low-rank width (0: ``ceil(d_model / 16)``).
        conv_bias: the convolution has a bias.
        bias: the in/out projections have biases.
        inner_norms: RMSNorms on ``δ``, ``B`` and ``C`` (Jamba).
        chunk: positions per chunk of the two-level training scan.
    """

    kind: str = field(default="mamba", init=False)
    expand: int = 2
    state_dim: int = 16
    conv_width: int = 4
    dt_rank: int = 0
    conv_bias: bool = True
    bias: bool = False
    inner_norms: bool = True
    chunk: int = 32

    def __post_init__(self) -> None:
        check_fields(self, f"{self.kind}.")
        for name in ("expand", "state_dim", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"mamba.{name} must be >= 1, got {getattr(self, name)}")
        if self.dt_rank < 0:
            raise ValueError(
                f"mamba.dt_rank must be >= 0 (0: ceil(d_model / 16)), got {self.dt_rank}"
            )
        if self.conv_width < 2:
            raise ValueError(f"mamba.conv_width must be >= 2, got {self.conv_width}")

    def rank(self, d_model: int) -> int:
        """``R`` for a model of width ``d_model``."""
        return self.dt_rank or math.ceil(d_model / 16)

    def build(self, *, d_model: int, norm_eps: float) -> Mamba:
        return Mamba(self, d_model=d_model, norm_eps=norm_eps)

    def state_shapes(self, batch: int, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        inner = self.expand * d_model
        return (batch, inner, self.conv_width - 1), (batch, inner, self.state_dim)

    def state_flops_per_token(self, d_model: int) -> int:
        """Decay, write and read-out of the ``(I, N)`` state: ``≈ 6 I N``."""
        return 6 * self.expand * d_model * self.state_dim


class Mamba(RecurrentMixer):
    """``(B, S, D) -> (B, S, D)``; see the module docstring. ``use_loop`` runs the scan one
    position at a time (the reference)."""

    config: MambaConfig
    #: not adapted by LoRA: the time step's expansion from rank ``R`` (already low rank), whose
    #: weight ``transformers``' Jamba reads directly, so a PEFT adapter on it would not apply
    lora_excluded: ClassVar[tuple[str, ...]] = ("dt_proj",)

    def __init__(self, config: MambaConfig, *, d_model: int, norm_eps: float) -> None:
        super().__init__()
        self.config, self.d_model = config, d_model
        c, inner, rank = config, config.expand * d_model, config.rank(d_model)
        self.inner = inner
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=c.bias)
        self.conv1d = nn.Conv1d(inner, inner, c.conv_width, groups=inner, bias=c.conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * c.state_dim, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(rank**-0.5), rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(time_step_bias(inner))
        A = torch.arange(1, c.state_dim + 1, dtype=torch.float32).expand(inner, -1)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=c.bias)
        self.dt_layernorm: nn.Module | None = None
        self.b_layernorm: nn.Module | None = None
        self.c_layernorm: nn.Module | None = None
        if c.inner_norms:
            self.dt_layernorm = nn.RMSNorm(rank, eps=norm_eps)
            self.b_layernorm = nn.RMSNorm(c.state_dim, eps=norm_eps)
            self.c_layernorm = nn.RMSNorm(c.state_dim, eps=norm_eps)
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
        keep = None if mask_BS is None else mask_BS.unsqueeze(-1).to(x_BSD.dtype)
        if keep is not None:
            x_BSD = x_BSD * keep
        x, z = self.in_proj(x_BSD).chunk(2, dim=-1)
        conv_state, state = (None, None) if cache is None else cache
        x, new_conv_state = kernels.conv(
            x,
            self.conv1d.weight.squeeze(1),
            self.conv1d.bias,
            kernel=c.kernel,
            state_BCW=conv_state,
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
        )
        x = F.silu(x)
        if keep is not None:
            x = x * keep
        rank = self.dt_proj.in_features
        delta, b, cc = self.x_proj(x).split([rank, c.state_dim, c.state_dim], dim=-1)
        if self.dt_layernorm is not None and self.b_layernorm is not None:
            delta, b = self.dt_layernorm(delta), self.b_layernorm(b)
        if self.c_layernorm is not None:
            cc = self.c_layernorm(cc)
        dt = F.softplus(self.dt_proj(delta).to(work))
        A = -torch.exp(self.A_log.to(work))
        options = dict(initial_state_BDN=state, mask_BS=mask_BS, segment_ids_BS=segment_ids_BS)
        if self.use_loop or (cache is not None and S == 1):
            y, new_state = selective_scan_loop(x, dt, A, b, cc, **options)
        else:
            y, new_state = selective_scan_chunked(x, dt, A, b, cc, chunk=c.chunk, **options)
        if cache is not None:
            cache[0].copy_(new_conv_state)
            cache[1].copy_(new_state)
        y = (y + x.to(work) * self.D.to(work)) * F.silu(z.to(work))
        return self.out_proj(y.to(x_BSD.dtype))
