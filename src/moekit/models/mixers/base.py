"""What every recurrent token mixer shares: the config base (a ``kind`` picks the class, in
files), the marker the model, LoRA and the presets find mixers by, and the gated RMSNorm."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moekit.models.mixers.kernels import MixerKernel


@dataclass(kw_only=True)
class RecurrentMixerConfig:
    """Base of the recurrent token mixers' configs; each subclass sets ``kind`` and builds its
    mixer with ``build(*, d_model, norm_eps)``.

    Args:
        kernel: ``torch`` (the PyTorch forms, the reference) or ``library``: the field's CUDA
            kernels where installed and applicable (``moekit.models.mixers.kernels``:
            flash-linear-attention, mamba-ssm, causal-conv1d), the PyTorch form otherwise with
            a logged reason.
    """

    kind: str = field(default="", init=False)
    kernel: MixerKernel = MixerKernel.TORCH
    registry: ClassVar[dict[str, type[RecurrentMixerConfig]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("kind")
        kind = declared.default if isinstance(declared, dataclasses.Field) else declared
        if isinstance(kind, str) and kind:
            RecurrentMixerConfig.registry[kind] = cls

    def build(self, *, d_model: int, norm_eps: float) -> nn.Module:
        raise NotImplementedError

    def state_shapes(self, batch: int, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(convolution state shape, recurrent state shape)`` for ``batch`` sequences."""
        raise NotImplementedError

    def state_flops_per_token(self, d_model: int) -> int:
        """FLOPs per token of the recurrent state's update and read-out, beyond the mixer's
        projections (which the parameter count covers); 0 for a mixer without one."""
        return 0


class RecurrentMixer(nn.Module):
    """Marker base of the recurrent token mixers (``token_mixer`` names the sublayer for the
    presets and LoRA; ``recurrent`` tells the block to pass padding and segments).

    ``forward(x_BSD, *, cache, mask_BS, segment_ids_BS) -> (B, S, D)``: ``cache`` is the
    ``(conv state, recurrent state)`` pair of this layer, updated in place, or ``None``.
    """

    #: what the presets and LoRA find token mixers by: "attention" or "recurrent"
    token_mixer: ClassVar[str] = "recurrent"
    recurrent: ClassVar[bool] = True
    config: RecurrentMixerConfig
    d_model: int

    def cache_shapes(
        self, batch: int, max_len: int
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str]]:
        """The decoding cache's (convolution state, recurrent state) shapes; the recurrent
        state is kept in float32 whatever the model's dtype. ``max_len`` does not matter: the
        state has a fixed size."""
        conv, recurrent = self.config.state_shapes(batch, self.d_model)
        return conv, recurrent, ("float32",)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x) · weight · silu(z)`` (``norm_before_gate``, Gated DeltaNet) or
    ``RMSNorm(x · silu(z)) · weight`` per group of ``group_size`` channels (Mamba2)."""

    def __init__(
        self, width: int, eps: float, *, norm_before_gate: bool = True, group_size: int = 0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or width

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        x = x.to(work)
        if not self.norm_before_gate:
            x = x * nn.functional.silu(z.to(work))
        grouped = x.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        x = grouped.flatten(-2)
        if self.norm_before_gate:
            return ((self.weight * x.to(dtype)) * nn.functional.silu(z.to(work))).to(dtype)
        return self.weight * x.to(dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(‖x‖² + eps)`` over the last dimension (as the FLA kernels do)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def time_step_bias(width: int, dt_min: float = 0.001, dt_max: float = 0.1) -> torch.Tensor:
    """``softplus^-1(dt)`` for ``width`` time steps drawn log-uniformly in ``[dt_min, dt_max]``:
    the Mamba initialisation of the time step's bias (Gu & Dao 2023), shared by Mamba and
    Mamba2."""
    low, high = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(width) * (high - low) + low)
    return dt + torch.log(-torch.expm1(-dt))
