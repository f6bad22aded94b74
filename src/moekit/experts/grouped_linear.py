"""A differentiable grouped matmul: each expert's rows times that expert's matrix.

Legend: M = rows sorted by expert, K = input width, N = output width, E = experts.

The fused expert FFN (``fused_ffn.py``) has its own backward; this is the building block for the
paths that need the pieces separately: LoRA adapters on the experts (``(x A_e) B_e`` on the same
sorted rows as the grouped GEMM, no per-expert weight delta materialised) and dropout inside the
experts. ``torch.nn.functional.grouped_mm``'s own backward fails on the CPU in torch 2.13, so the
backward here calls the same kernels as the fused FFN's.
"""

from __future__ import annotations

import torch

from moekit.experts.grouped_matmul import (
    GroupedMatmulKernel,
    grouped_mm_forward,
    grouped_mm_weight_grad,
    resolve_kernel,
)
from moekit.utils.precision import autocast_off, autocast_operands


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_EKN, counts_E, kernel_fwd, kernel_bwd):  # type: ignore[override]
        ctx.save_for_backward(x_MK, w_EKN, counts_E)
        ctx.kernel_fwd, ctx.kernel_bwd = kernel_fwd, kernel_bwd
        return grouped_mm_forward(x_MK, w_EKN, counts_E, kernel_fwd)

    @staticmethod
    def backward(ctx, grad_MN):  # type: ignore[override]
        x_MK, w_EKN, counts_E = ctx.saved_tensors
        grad_MN = grad_MN.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # a transposed view: grouped_mm takes a column-major right operand (no copy)
            grad_x = grouped_mm_forward(grad_MN, w_EKN.transpose(1, 2), counts_E, ctx.kernel_bwd)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_mm_weight_grad(x_MK, grad_MN, counts_E, ctx.kernel_fwd)
        return grad_x, grad_w, None, None, None


def grouped_linear(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts_E: torch.Tensor,
    kernel: GroupedMatmulKernel | str = GroupedMatmulKernel.AUTO,
) -> torch.Tensor:
    """``(M, N)``: expert ``e``'s ``counts_E[e]`` consecutive rows of ``x_MK`` times
    ``w_EKN[e]`` ``(K, N)``; differentiable in ``x_MK`` and ``w_EKN``. Under ``torch.autocast``
    it computes in the autocast dtype (casts outside the autograd function, like ``F.linear``).
    """
    device = x_MK.device
    x_MK, w_EKN = autocast_operands(device, x_MK, w_EKN)  # type: ignore[assignment]
    if x_MK.dtype != w_EKN.dtype:
        raise TypeError(f"x dtype {x_MK.dtype} differs from the weight dtype {w_EKN.dtype}")
    E, K, N = w_EKN.shape
    kernel_fwd = resolve_kernel(kernel, x_MK.dtype, K, N, device=device, num_groups=E)
    kernel_bwd = resolve_kernel(kernel, x_MK.dtype, N, K, device=device, num_groups=E)
    with autocast_off(device):
        return _GroupedLinear.apply(x_MK.contiguous(), w_EKN, counts_E, kernel_fwd, kernel_bwd)
