"""Expert activations, plain and gated (Shazeer 2020, "GLU Variants Improve Transformer").

Gated activations take a projection of width ``2 * H`` laid out as ``[gate | up]`` along the last
dimension and return ``act(gate) * up`` of width ``H``.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class Activation(str, Enum):
    """An expert activation; the gated ones (``swiglu``, ``geglu``) double the input width."""

    RELU = "relu"
    GELU = "gelu"
    SILU = "silu"
    SWIGLU = "swiglu"
    GEGLU = "geglu"

    @property
    def is_gated(self) -> bool:
        return self in (Activation.SWIGLU, Activation.GEGLU)


def in_projection_width(activation: Activation, hidden: int) -> int:
    """Width of the first projection: ``2 * hidden`` for gated activations, else ``hidden``."""
    return 2 * hidden if Activation(activation).is_gated else hidden


def apply_activation(activation: Activation, h_NH: torch.Tensor) -> torch.Tensor:
    """Apply ``activation`` to the first projection's output.

    Args:
        activation: which activation.
        h_NH: ``(..., H)`` or, for gated activations, ``(..., 2H)`` laid out as ``[gate | up]``.

    Returns:
        ``(..., H)``.
    """
    activation = Activation(activation)
    if activation is Activation.RELU:
        return F.relu(h_NH)
    if activation is Activation.GELU:
        return F.gelu(h_NH)
    if activation is Activation.SILU:
        return F.silu(h_NH)
    gate, up = h_NH.chunk(2, dim=-1)
    if activation is Activation.SWIGLU:
        return F.silu(gate) * up
    return F.gelu(gate) * up
