"""The one seam for the expert computation's kernels: ``ExpertConfig.kernel`` chooses, at build
time, between the PyTorch path (``auto``, ``grouped_mm``, ``loop``: grouped matmuls over
gathered rows, then the combine; the reference every backend is tested against), moekit's fused
Triton kernels (``triton``: gather, both GEMMs, the activation and the weighted scatter-add in
two kernels, ``moekit.experts.triton_moe``) and Liger-Kernel's fused MoE (``liger``, a
third-party library: ``moekit.experts.liger_moe``).

A backend that cannot run a call (not installed, another device, an activation or feature it
does not have) falls back to the PyTorch path, logging the reason once; it never fails at run
time.
"""

from __future__ import annotations

import logging

import torch

from moekit.experts.bank import ExpertBank
from moekit.experts.grouped_matmul import GroupedMatmulKernel
from moekit.experts.liger_moe import LIGER_ACTIVATIONS, liger_available, liger_moe
from moekit.utils.precision import autocast_operands

logger = logging.getLogger(__name__)
_reported: set[tuple[GroupedMatmulKernel, str]] = set()


def _fall_back(kernel: GroupedMatmulKernel, reason: str) -> None:
    if (kernel, reason) not in _reported:
        _reported.add((kernel, reason))
        logger.warning("experts.kernel=%r falls back to the PyTorch path: %s", kernel.value, reason)


def fused_reason(
    experts: object,
    x_TD: torch.Tensor,
    weight_input: bool,
    kernel: GroupedMatmulKernel = GroupedMatmulKernel.TRITON,
) -> str:
    """Why the fused ``kernel`` (``triton`` or ``liger``) cannot run this call ("" when it
    can)."""
    # imports triton: only where a layer asks for fused kernels
    from moekit.experts.triton_moe import (  # noqa: PLC0415 (optional: triton)
        TRITON_ACTIVATIONS,
        triton_available,
    )

    if not isinstance(experts, ExpertBank):
        return f"the experts are a {type(experts).__name__}, not an ExpertBank"
    available, why = triton_available(x_TD.device)
    if not available:
        return why
    if kernel is GroupedMatmulKernel.LIGER:
        available, why = liger_available()
        if not available:
            return why
        if experts.activation not in LIGER_ACTIVATIONS:
            return f"activation {experts.activation.value!r} has no Liger kernel (swiglu only)"
    elif experts.activation not in TRITON_ACTIVATIONS:
        return f"activation {experts.activation.value!r} has no fused kernel"
    if experts.b_in_EH is not None:
        return "expert biases have no fused kernel"
    if experts.adapter is not None and experts.adapter.active:
        return "expert adapters (LoRA) run as separate products"
    if experts.dropout and experts.training:
        return "expert dropout in training runs as separate products"
    if weight_input:
        return "dispatch.weight_input (the router score on the expert input)"
    return ""


def fused_experts(
    experts: object, x_TD: torch.Tensor, plan, *, weight_input: bool
) -> torch.Tensor | None:
    """``(T, D)`` from the fused kernels (moekit's Triton kernels or Liger-Kernel's) when
    ``experts`` asks for them and they can run this call, else ``None`` (the caller takes the
    PyTorch path)."""
    kernel = getattr(experts, "kernel", None)
    if kernel not in (GroupedMatmulKernel.TRITON, GroupedMatmulKernel.LIGER):
        return None
    reason = fused_reason(experts, x_TD, weight_input, kernel)
    if kernel is GroupedMatmulKernel.LIGER and not reason and not plan.top_k:
        reason = "the dispatch plan does not say its slots per token"
    if reason:
        _fall_back(kernel, reason)
        return None
    assert isinstance(experts, ExpertBank)
    x, w_in, w_out = autocast_operands(x_TD.device, x_TD, experts.w_in_EDH, experts.w_out_EHD)
    assert x is not None and w_in is not None and w_out is not None
    if kernel is GroupedMatmulKernel.LIGER:
        out = liger_moe(
            x,
            plan.token_idx_M,
            plan.assignment_idx_M,
            plan.weights_M,
            plan.expert_rows_E,
            plan.top_k,
            w_in,
            w_out,
        )
        return out.to(x_TD.dtype)

    from moekit.experts.triton_moe import triton_moe  # noqa: PLC0415 (optional: triton)

    out = triton_moe(
        x,
        plan.token_idx_M,
        plan.weights_M,
        plan.expert_rows_E,
        w_in,
        w_out,
        experts.activation,
    )
    return out.to(x_TD.dtype)
