"""Causal depthwise convolution over positions, with a decoding state, padding and packed
sequences: the short convolution in front of Mamba2's and Gated DeltaNet's recurrences and
LFM2's gated short-convolution mixer.

Legend: B = batch, S = positions, C = channels, W = kernel width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(
    x_BSC: torch.Tensor,
    weight_CW: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    *,
    state_BCW: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_t = bias + Σ_j weight[:, j] · x_{t - (W - 1) + j}`` per channel.

    Args:
        x_BSC: ``(B, S, C)`` inputs.
        weight_CW: ``(C, W)`` one filter per channel (an ``nn.Conv1d(C, C, W, groups=C)``
            weight without its middle dimension).
        bias_C: ``(C,)`` or ``None``.
        state_BCW: the ``W - 1`` inputs before ``x`` ``(B, C, W - 1)`` (zeros when ``None``:
            the sequence starts here).
        mask_BS: ``False`` at padding: those inputs count as zeros.
        segment_ids_BS: packed sequences: a position sees only inputs of its own segment.

    Returns:
        ``(B, S, C)`` outputs and the new state ``(B, C, W - 1)``: the last ``W - 1`` inputs.
    """
    B, S, C = x_BSC.shape
    W = weight_CW.shape[1]
    if mask_BS is not None:
        x_BSC = x_BSC * mask_BS.unsqueeze(-1).to(x_BSC.dtype)
    history = x_BSC.new_zeros(B, C, W - 1) if state_BCW is None else state_BCW.to(x_BSC.dtype)
    x_BCS = torch.cat([history, x_BSC.transpose(1, 2)], dim=2)  # (B, C, W - 1 + S)
    new_state = x_BCS[:, :, x_BCS.shape[2] - (W - 1) :]
    if segment_ids_BS is None:
        y_BCS = F.conv1d(x_BCS, weight_CW.unsqueeze(1).to(x_BSC.dtype), groups=C)
        if bias_C is not None:
            y_BCS = y_BCS + bias_C.to(y_BCS.dtype).unsqueeze(-1)
        return y_BCS.transpose(1, 2), new_state
    # packed: tap j looks back W - 1 - j positions; it sees the input only inside the segment
    positions = torch.arange(S, device=x_BSC.device)
    starts = torch.ones_like(segment_ids_BS, dtype=torch.bool)
    starts[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    start_BS = torch.where(starts, positions, 0).cummax(dim=1).values
    offset_BS = positions - start_BS  # positions since the segment began
    windows_BSCW = x_BCS.unfold(2, W, 1).permute(0, 2, 1, 3)  # (B, S, C, W)
    lag_W = torch.arange(W - 1, -1, -1, device=x_BSC.device)
    # the first segment of a call continues the state (decoding); later ones start fresh
    first = start_BS == 0
    visible_BSW = (lag_W <= offset_BS.unsqueeze(-1)) | first.unsqueeze(-1)
    windows_BSCW = windows_BSCW * visible_BSW.unsqueeze(2).to(x_BSC.dtype)
    y_BSC = (windows_BSCW * weight_CW.to(x_BSC.dtype)).sum(-1)
    if bias_C is not None:
        y_BSC = y_BSC + bias_C.to(y_BSC.dtype)
    # the state continues the last segment: inputs of earlier segments are not part of it
    kept_positions = torch.arange(S - (W - 1), S, device=x_BSC.device)  # < 0: the history
    last_start = start_BS[:, -1:]
    kept_BW = (kept_positions >= last_start) | (last_start == 0)
    return y_BSC, new_state * kept_BW.unsqueeze(1).to(new_state.dtype)


def causal_conv_loop(
    x_BSC: torch.Tensor,
    weight_CW: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    *,
    state_BCW: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_conv` one position at a time, keeping a rolling window (the reference)."""
    B, S, C = x_BSC.shape
    W = weight_CW.shape[1]
    window = x_BSC.new_zeros(B, C, W - 1) if state_BCW is None else state_BCW.clone()
    outputs = []
    for t in range(S):
        x_t = x_BSC[:, t]
        if mask_BS is not None:
            x_t = x_t * mask_BS[:, t].unsqueeze(-1).to(x_t.dtype)
        if segment_ids_BS is not None and t > 0:
            new_segment = (segment_ids_BS[:, t] != segment_ids_BS[:, t - 1]).to(x_t.dtype)
            window = window * (1 - new_segment)[:, None, None]
        full = torch.cat([window, x_t.unsqueeze(-1)], dim=2)  # (B, C, W)
        y_t = (full * weight_CW).sum(-1)
        outputs.append(y_t if bias_C is None else y_t + bias_C)
        window = full[:, :, 1:]
    return torch.stack(outputs, dim=1), window
