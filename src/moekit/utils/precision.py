"""Mixed precision for the experts: run them in the autocast dtype with fp32 master weights.

``torch.nn.functional.grouped_mm`` has no autocast kernel (pytorch#174763): under
``torch.autocast`` it runs in whatever dtype it is given. The residual stream of a model under
autocast stays fp32, so without help the experts would compute in fp32 (on CUDA through
torch's per-expert fallback, with a host sync per call). :func:`autocast_operands` casts the
rows, weights and biases to the autocast dtype *outside* the experts' autograd functions, so
autograd casts the gradients back and fp32 master weights get fp32 gradients, as ``F.linear``
does under autocast.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The lower-precision dtype autocast computes matmuls in on ``device``, or ``None`` when
    autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_operands(
    device: torch.device, *tensors: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype of ``device`` (unchanged when autocast is off;
    ``None`` stays ``None``). The casts are differentiable."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A block in which autocast is off on ``device`` (a no-op context when it already is)."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
