"""Which keys each query may see: causal, sliding-window, padding and packed-segment masks.

Legend: B = batch, S = new positions (queries), L = cached + new positions (keys).
"""

from __future__ import annotations

import torch


def allowed_keys(
    S: int,
    L: int,
    start: int | torch.Tensor,
    *,
    causal: bool,
    window: int = 0,
    chunk: int = 0,
    key_mask_BL: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: ``(S, L)``, or ``(B, 1, S, L)`` with a key mask.

    Queries are positions ``start .. start+S-1`` of the ``L`` keys (``start`` may be a 0-dim
    device tensor: fixed-shape decoding); ``window`` keeps the last
    ``window`` keys of each query (0: all); ``chunk`` keeps the keys in the query's chunk of
    ``chunk`` positions (0: off); ``key_mask_BL`` (``True`` = real token) hides
    padding keys, or, shaped ``(B, 1, S, L)``, says per query which keys it may see (packed
    segments). A padding query may then see no key at all, which would make its softmax NaN:
    it is allowed to see itself instead (no real query ever sees a padding key, so real
    outputs are unchanged).
    """
    query_S1 = (torch.arange(S, device=device) + start).unsqueeze(1)
    key_1L = torch.arange(L, device=device).unsqueeze(0)
    allowed = key_1L <= query_S1 if causal else torch.ones(S, L, dtype=torch.bool, device=device)
    if window:
        allowed = allowed & (key_1L > query_S1 - window)
    if chunk:  # local attention within fixed chunks of positions (Llama 4)
        allowed = allowed & (
            torch.div(key_1L, chunk, rounding_mode="floor")
            == torch.div(query_S1, chunk, rounding_mode="floor")
        )
    if key_mask_BL is not None:
        B = key_mask_BL.shape[0]
        # (B, L): padding keys; (B, 1, S, L): any per-query mask (packed sequences' segments)
        keys = key_mask_BL if key_mask_BL.dim() == 4 else key_mask_BL.view(B, 1, 1, L)
        allowed = (allowed & keys) | (key_1L == query_S1)
    return allowed
