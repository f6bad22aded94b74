"""Rotary position embeddings (RoPE, Su et al. 2021) in the rotate-half layout, with YaRN
context extension (Peng et al. 2023).

Legend: B = batch, H = heads, S = positions, D = rotated width (a head's, or MLA's RoPE part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.utils.validation import check_fields


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, scaling) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp in between."""
    dim = head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (
            dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
        ) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if scaling.attention_factor is not None:
        factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    else:
        factor = yarn_mscale(scaling.factor)
    return inv_freq, factor


def _llama3_inv_freq(head_dim: int, theta: float, scaling) -> torch.Tensor:
    """Llama 3's frequency-dependent interpolation: long wavelengths divided by ``factor``,
    short ones kept, a smooth ramp between (``low_freq_factor``/``high_freq_factor``)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _proportional_inv_freq(head_dim: int, theta: float, scaling) -> torch.Tensor:
    """The first ``int(rotated_fraction * head_dim / 2)`` frequencies ``θ^(-2i/head_dim)``,
    then zeros (no rotation), all divided by ``factor`` (transformers' ``proportional``)."""
    turning = int(scaling.rotated_fraction * head_dim // 2)
    inv_freq = torch.zeros(head_dim // 2, dtype=torch.float32, device="cpu")
    steps = torch.arange(0, 2 * turning, 2, dtype=torch.int64, device="cpu").to(torch.float32)
    inv_freq[:turning] = 1.0 / theta ** (steps / head_dim)
    return inv_freq / scaling.factor


@dataclass(kw_only=True)
class RopeScalingConfig:
    """Rotary context extension: YaRN (Peng et al. 2023; DeepSeek-V3, GPT-OSS) or Llama 3's
    frequency-dependent interpolation (Llama 3.1, Llama 4); or ``proportional`` positions
    (Gemma 4's global layers): the whole head in the rotate-half layout, only the first
    ``rotated_fraction`` of its frequency pairs turning (``θ^(-2i/head_dim)``, divided by
    ``factor``), the rest with frequency 0.

    Args:
        kind: ``yarn``, ``llama3`` or ``proportional``.
        factor: context extension factor.
        original_max_position_embeddings: the pre-extension context.
        beta_fast, beta_slow: rotation counts bounding the interpolation ramp.
        mscale, mscale_all_dim: DeepSeek's attention-temperature terms (0 = unused).
        attention_factor: explicit cos/sin scale (``None``: derived from the above).
        truncate: round the ramp bounds to whole dimensions.
        low_freq_factor, high_freq_factor: Llama 3's wavelength bounds (``original / factor``).
        rotated_fraction: ``proportional``: the share of frequency pairs that rotate.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    kind: str = "yarn"
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    rotated_fraction: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kind not in ("yarn", "llama3", "proportional"):
            raise ValueError(
                f"rope_scaling.kind must be 'yarn', 'llama3' or 'proportional', got {self.kind!r}"
            )
        if not 0 <= self.rotated_fraction <= 1:
            raise ValueError(
                f"rope_scaling.rotated_fraction must be in [0, 1], got {self.rotated_fraction}"
            )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope_scaling.high_freq_factor must exceed low_freq_factor")
        if self.factor <= 0 or self.original_max_position_embeddings < 1:
            raise ValueError(
                "rope_scaling.factor must be > 0 and original_max_position_embeddings >= 1"
            )


@dataclass(kw_only=True)
class RotaryConfig:
    """Rotary positions of an attention mixer (RoPE, Su et al. 2021).

    Args:
        theta: the rotary base.
        scaling: context extension (``RopeScalingConfig``: YaRN, Llama 3, proportional), or
            ``None``.
        partial_factor: rotate only the first ``int(head_dim * partial_factor)`` dimensions of
            each query and key head, the rest carry no position (GLM-4.5, MiniMax-M2, Phi;
            1.0: the whole head).
    """

    theta: float = 10000.0
    scaling: RopeScalingConfig | None = None
    partial_factor: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "rope.")
        if not self.theta > 0:
            raise ValueError(f"rope.theta must be > 0, got {self.theta}")
        if not 0 < self.partial_factor <= 1:
            raise ValueError(f"rope.partial_factor must be in (0, 1], got {self.partial_factor}")


def rotary_tables(
    head_dim: int, max_positions: int, theta: float, scaling=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of shape ``(max_positions, head_dim)`` for rotate-half RoPE (Su et al.),
    optionally YaRN-scaled (``scaling``: a ``RopeScalingConfig``)."""
    if scaling is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        attention_factor = 1.0
    elif scaling.kind == "llama3":
        inv_freq, attention_factor = _llama3_inv_freq(head_dim, theta, scaling), 1.0
    elif scaling.kind == "proportional":
        inv_freq, attention_factor = _proportional_inv_freq(head_dim, theta, scaling), 1.0
    else:
        inv_freq, attention_factor = _yarn_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rotary(x_BHSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    first, second = x_BHSD.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x_BHSD * cos_SD.to(x_BHSD.dtype) + rotated * sin_SD.to(x_BHSD.dtype)
