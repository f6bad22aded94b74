"""The recurrent mixers' one kernel seam: the PyTorch forms (``models/mixers/recurrence.py``,
``conv.py``: loop references and chunked parallel forms) or the field's CUDA kernels, chosen at
build time by a mixer config's ``kernel``:

- ``torch``: the PyTorch forms, everywhere (the reference every other kernel is tested against);
- ``library``: where installed and applicable, ``flash-linear-attention``'s chunked gated delta
  rule (Gated DeltaNet), ``mamba-ssm``'s chunked scan (Mamba2) and ``causal-conv1d`` (the short
  causal convolutions). Each call that a library cannot take (not installed, not on CUDA, a
  float64 input, packed sequences, a decoding step with a cache) runs the PyTorch form and logs
  the reason once; it never fails at run time.

``auto`` is not offered: until these paths are timed and checked on a GPU in this project, a
model uses a library kernel only when its config asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from enum import Enum
from typing import Any

import torch

from moekit.models.mixers.conv import causal_conv
from moekit.models.mixers.recurrence import recurrence_chunked

logger = logging.getLogger(__name__)
_reported: set[str] = set()


class MixerKernel(str, Enum):
    """A recurrent mixer's kernels: the PyTorch forms or the field's CUDA libraries."""

    TORCH = "torch"
    LIBRARY = "library"


#: the module each library path imports, by what it computes
LIBRARY_MODULES = {
    "gated_delta_rule": "fla.ops.gated_delta_rule",
    "mamba_scan": "mamba_ssm.ops.triton.ssd_combined",
    "causal_conv": "causal_conv1d",
}


def _fall_back(what: str, reason: str) -> None:
    message = f"{what}: {reason}"
    if message not in _reported:
        _reported.add(message)
        logger.warning("kernel='library' runs the PyTorch form for %s", message)


def library_reason(what: str, x: torch.Tensor, *, segments: torch.Tensor | None) -> str:
    """Why the library kernel for ``what`` cannot take this call ("" when it can)."""
    module = LIBRARY_MODULES[what]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module.split('.')[0]} is not installed"
    if x.device.type != "cuda":
        return f"the input is on {x.device.type}, the library kernels run on CUDA"
    if x.dtype == torch.float64:
        return "float64 inputs (the library kernels compute in float32 or lower)"
    if segments is not None:
        return "packed sequences (segment_ids) run in the PyTorch form"
    return ""


def _library(what: str, x: torch.Tensor, kernel: MixerKernel, segments) -> Any:
    """The library module for ``what`` when ``kernel`` asks for it and it applies, else
    ``None`` (the reason logged once)."""
    if MixerKernel(kernel) is not MixerKernel.LIBRARY:
        return None
    reason = library_reason(what, x, segments=segments)
    if reason:
        _fall_back(what, reason)
        return None
    return importlib.import_module(LIBRARY_MODULES[what])


def gated_delta_rule(
    q_BSHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor | None,
    *,
    kernel: MixerKernel,
    chunk: int,
    initial_state_BHKV: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked (gated) delta rule of :func:`recurrence_chunked` (same arguments and
    results), through ``flash-linear-attention``'s ``chunk_gated_delta_rule`` when ``kernel``
    is ``library`` and it applies (``beta`` given). Queries come scaled; padding keeps the
    state (decay 1, no write), as in the PyTorch form."""
    fla = None if beta_BSH is None else _library("gated_delta_rule", v_BSHV, kernel, segment_ids_BS)
    if fla is None:
        return recurrence_chunked(
            q_BSHK,
            k_BSHK,
            v_BSHV,
            g_BSH,
            beta_BSH,
            initial_state_BHKV=initial_state_BHKV,
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
            chunk=chunk,
        )
    assert beta_BSH is not None
    if mask_BS is not None:
        g_BSH = g_BSH.masked_fill(~mask_BS.unsqueeze(-1), 0.0)
        beta_BSH = beta_BSH.masked_fill(~mask_BS.unsqueeze(-1), 0.0)
    state = None if initial_state_BHKV is None else initial_state_BHKV.float()
    out, final = fla.chunk_gated_delta_rule(
        q_BSHK,
        k_BSHK,
        v_BSHV.to(q_BSHK.dtype),
        g_BSH,
        beta_BSH,
        scale=1.0,
        initial_state=state,
        output_final_state=True,
    )
    return out, final


def mamba_scan(
    x_BSHP: torch.Tensor,
    dt_BSH: torch.Tensor,
    A_H: torch.Tensor,
    b_BSHN: torch.Tensor,
    c_BSHN: torch.Tensor,
    *,
    kernel: MixerKernel,
    chunk: int,
    initial_state_BHNP: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's scan ``h_t = exp(dt_t A) h_{t-1} + dt_t b_t x_tᵀ``, ``y_t = c_tᵀ h_t``
    (``(B, S, H, P)`` outputs and the ``(B, H, N, P)`` state), through ``mamba-ssm``'s
    ``mamba_chunk_scan_combined`` when ``kernel`` is ``library`` and it applies, else
    :func:`recurrence_chunked`. Padding (``dt = 0``) keeps the state."""
    if mask_BS is not None:
        dt_BSH = dt_BSH.masked_fill(~mask_BS.unsqueeze(-1), 0.0)
    ssd = _library("mamba_scan", x_BSHP, kernel, segment_ids_BS)
    if ssd is None:
        return recurrence_chunked(
            c_BSHN,
            b_BSHN,
            x_BSHP.to(dt_BSH.dtype) * dt_BSH.unsqueeze(-1),
            dt_BSH * A_H,
            initial_state_BHKV=initial_state_BHNP,
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
            chunk=chunk,
        )
    state = None if initial_state_BHNP is None else initial_state_BHNP.float().transpose(-1, -2)
    y, final_BHPN = ssd.mamba_chunk_scan_combined(
        x_BSHP,
        dt_BSH,
        A_H,
        b_BSHN,
        c_BSHN,
        chunk_size=chunk,
        initial_states=state,
        dt_softplus=False,
        return_final_states=True,
    )
    return y, final_BHPN.transpose(-1, -2)


def conv(
    x_BSC: torch.Tensor,
    weight_CW: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    *,
    kernel: MixerKernel,
    state_BCW: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
    segment_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_conv` (same arguments and results), through ``causal-conv1d``'s
    ``causal_conv1d_fn`` when ``kernel`` is ``library`` and it applies (a training call: no
    cached state)."""
    library = (
        None if state_BCW is not None else _library("causal_conv", x_BSC, kernel, segment_ids_BS)
    )
    if library is None:
        return causal_conv(
            x_BSC,
            weight_CW,
            bias_C,
            state_BCW=state_BCW,
            mask_BS=mask_BS,
            segment_ids_BS=segment_ids_BS,
        )
    if mask_BS is not None:
        x_BSC = x_BSC * mask_BS.unsqueeze(-1).to(x_BSC.dtype)
    width = weight_CW.shape[1]
    x_BCS = x_BSC.transpose(1, 2)
    y_BCS = library.causal_conv1d_fn(x_BCS.contiguous(), weight_CW, bias_C, activation=None)
    history = torch.nn.functional.pad(x_BCS, (width - 1, 0))
    return y_BCS.transpose(1, 2), history[:, :, history.shape[2] - (width - 1) :]
