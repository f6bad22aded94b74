"""Writing new keys and values into a preallocated cache and reading back what attention sees.

``start`` is where the new positions go: a Python ``int`` (the cache is read up to
``start + S``: shapes grow by a position per step) or a 0-dim device tensor (fixed-shape
decoding: every slot is read and the mask hides the ones not yet written, so each step has the
same shapes, reads nothing on the host and can be captured as a CUDA graph).
"""

from __future__ import annotations

import torch

Start = int | torch.Tensor


def new_positions(start: Start, S: int, device: torch.device) -> torch.Tensor:
    """``(S,)`` the slots of ``S`` new positions from ``start``."""
    return torch.arange(S, device=device) + start


def append(
    cache: tuple[torch.Tensor, torch.Tensor],
    new: tuple[torch.Tensor, torch.Tensor],
    start: Start,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``new`` (each ``(B, G, S, ...)``) at ``start`` of ``cache`` (each ``(B, G,
    max_len, ...)``, positions on dim 2) and return what attention reads: positions ``0 ..
    start+S-1`` for an ``int`` start, every slot for a tensor start; in the new tensors' dtype
    (a cache may be kept in another)."""
    first, second = cache
    S = new[0].shape[2]
    positions = new_positions(start, S, first.device)
    first.index_copy_(2, positions, new[0].to(first.dtype))
    second.index_copy_(2, positions, new[1].to(second.dtype))
    if isinstance(start, int):
        first, second = first.narrow(2, 0, start + S), second.narrow(2, 0, start + S)
    return first.to(new[0].dtype), second.to(new[1].dtype)
