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
    # squared ReLU, relu(x)^2 (So et al. 2021, Primer; Nemotron-H's non-gated experts)
    RELU2 = "relu2"
    GELU = "gelu"
    SILU = "silu"
    SWIGLU = "swiglu"
    GEGLU = "geglu"
    # GeGLU with the tanh approximation of GELU (Gemma's gelu_pytorch_tanh)
    GEGLU_TANH = "geglu_tanh"
    # GPT-OSS: gate clamped at 7, up clamped to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate)
    SWIGLU_OAI = "swiglu_oai"

    @property
    def is_gated(self) -> bool:
        return self in (
            Activation.SWIGLU,
            Activation.GEGLU,
            Activation.GEGLU_TANH,
            Activation.SWIGLU_OAI,
        )


OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


def _swiglu_oai(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate = gate.clamp(max=OAI_LIMIT)
    return (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1) * gate * torch.sigmoid(OAI_ALPHA * gate)


def in_projection_width(activation: Activation, hidden: int) -> int:
    """Width of the first projection: ``2 * hidden`` for gated activations, else ``hidden``."""
    return 2 * hidden if Activation(activation).is_gated else hidden


def activation_backward(
    activation: Activation, h_NH: torch.Tensor, grad_a_NH: torch.Tensor
) -> torch.Tensor:
    """Gradient of :func:`apply_activation` with respect to its input, written out by hand.

    Used by the fused expert FFN so that the gated case writes the gate and up gradients
    straight into one ``(..., 2H)`` buffer (no split/cat, no saved intermediates).

    Args:
        activation: which activation.
        h_NH: the activation's input, ``(..., H)`` or ``(..., 2H)`` for gated ones.
        grad_a_NH: gradient of the activation's output, ``(..., H)``; for gated activations it
            is overwritten (pass a tensor the caller no longer needs).

    Returns:
        Gradient with respect to ``h_NH``, same shape as ``h_NH``.
    """
    activation = Activation(activation)
    if not activation.is_gated:
        return _scalar_backward(activation, grad_a_NH, h_NH)
    if torch.compiler.is_compiling():  # the compiler fuses the plain form itself
        return _gated_backward_functional(activation, h_NH, grad_a_NH)
    # Write straight into the halves of one (..., 2H) buffer; grad_a_NH is consumed in place.
    gate, up = h_NH.chunk(2, dim=-1)
    grad_h = torch.empty_like(h_NH)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    if activation is Activation.SWIGLU_OAI:
        g = gate.clamp(max=OAI_LIMIT)
        sig = torch.sigmoid(OAI_ALPHA * g)
        glu = g * sig
        torch.mul(grad_a_NH, glu, out=grad_up)
        grad_up.mul_(((up >= -OAI_LIMIT) & (up <= OAI_LIMIT)).to(grad_up.dtype))
        d_glu = sig + OAI_ALPHA * glu * (1 - sig)
        torch.mul(grad_a_NH * (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1), d_glu, out=grad_gate)
        grad_gate.mul_((gate <= OAI_LIMIT).to(grad_gate.dtype))
    elif activation is Activation.SWIGLU:
        torch.ops.aten.silu.out(gate, out=grad_up)
        grad_up.mul_(grad_a_NH)
        grad_a_NH.mul_(up)
        torch.ops.aten.silu_backward.grad_input(grad_a_NH, gate, grad_input=grad_gate)
    else:
        approximate = gelu_approximation(activation)
        torch.ops.aten.gelu.out(gate, approximate=approximate, out=grad_up)
        grad_up.mul_(grad_a_NH)
        grad_a_NH.mul_(up)
        torch.ops.aten.gelu_backward.grad_input(
            grad_a_NH, gate, approximate=approximate, grad_input=grad_gate
        )
    return grad_h


def gelu_approximation(activation: Activation) -> str:
    """``"tanh"`` for ``geglu_tanh``, else ``"none"`` (the exact GELU)."""
    return "tanh" if activation is Activation.GEGLU_TANH else "none"


def _gated_backward_functional(
    activation: Activation, h_NH: torch.Tensor, grad_a_NH: torch.Tensor
) -> torch.Tensor:
    """The gated backward without ``out=`` writes into halves (which torch.compile refuses)."""
    gate, up = h_NH.chunk(2, dim=-1)
    if activation is Activation.SWIGLU_OAI:
        g = gate.clamp(max=OAI_LIMIT)
        sig = torch.sigmoid(OAI_ALPHA * g)
        glu = g * sig
        in_range = ((up >= -OAI_LIMIT) & (up <= OAI_LIMIT)).to(grad_a_NH.dtype)
        grad_up = grad_a_NH * glu * in_range
        d_glu = sig + OAI_ALPHA * glu * (1 - sig)
        grad_gate = grad_a_NH * (up.clamp(-OAI_LIMIT, OAI_LIMIT) + 1) * d_glu
        grad_gate = grad_gate * (gate <= OAI_LIMIT).to(grad_gate.dtype)
    elif activation is Activation.SWIGLU:
        grad_up = F.silu(gate) * grad_a_NH
        grad_gate = torch.ops.aten.silu_backward(grad_a_NH * up, gate)
    else:
        approximate = gelu_approximation(activation)
        grad_up = F.gelu(gate, approximate=approximate) * grad_a_NH
        grad_gate = torch.ops.aten.gelu_backward(grad_a_NH * up, gate, approximate=approximate)
    return torch.cat([grad_gate, grad_up], dim=-1)


def _scalar_backward(activation: Activation, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``grad * act'(h)`` in one fused ATen kernel per activation."""
    if activation is Activation.RELU:
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if activation is Activation.RELU2:  # d/dh relu(h)^2 = 2 relu(h)
        return grad * (2.0 * torch.relu(h))
    if activation is Activation.GELU:
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.silu_backward(grad, h)


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
    if activation is Activation.RELU2:
        return F.relu(h_NH).square()
    if activation is Activation.GELU:
        return F.gelu(h_NH)
    if activation is Activation.SILU:
        return F.silu(h_NH)
    gate, up = h_NH.chunk(2, dim=-1)
    if activation is Activation.SWIGLU:
        return F.silu(gate) * up
    if activation is Activation.SWIGLU_OAI:
        return _swiglu_oai(gate, up)
    return F.gelu(gate, approximate=gelu_approximation(activation)) * up
