"""The routed experts' whole FFN as one autograd function over expert-sorted rows.

Legend: M = rows sorted by expert, D = d_model, H = hidden (2H columns for gated activations),
E = experts.

``y = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` for each row's expert e. Written as
one function so the backward (a) writes the gate and up gradients straight into one buffer,
(b) saves only ``x``, the pre-activation ``h`` and the activation ``a`` (autograd through the
unfused ops would also keep ``act(gate)`` and copy gradients through a split/cat), and
(c) never indexes the stacked weights in a differentiable loop. Checked against the plain
per-expert math (``ExpertBank.forward_one``) on outputs and all gradients, and by float64
gradcheck.
"""

from __future__ import annotations

import torch

from moekit.experts import grouped_matmul
from moekit.experts.activations import (
    Activation,
    activation_backward,
    apply_activation,
    gelu_approximation,
)
from moekit.experts.grouped_matmul import (
    GroupedMatmulKernel,
    grouped_mm_forward,
    grouped_mm_weight_grad,
    resolve_kernel,
)
from moekit.utils.precision import autocast_off, autocast_operands


def _activation_forward(activation: Activation, h_MH: torch.Tensor) -> torch.Tensor:
    if activation is Activation.SWIGLU_OAI:
        return apply_activation(activation, h_MH)
    if activation.is_gated:
        gate, up = h_MH.chunk(2, dim=-1)
        a = (
            torch.nn.functional.silu(gate)
            if activation is Activation.SWIGLU
            else torch.nn.functional.gelu(gate, approximate=gelu_approximation(activation))
        )
        return a.mul_(up)
    if activation is Activation.RELU:
        return torch.relu(h_MH)
    if activation is Activation.RELU2:
        return torch.relu(h_MH).square()
    if activation is Activation.GELU:
        return torch.nn.functional.gelu(h_MH)
    return torch.nn.functional.silu(h_MH)


def _sum_rows_per_expert(g_MX: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``(E, X)`` sums of each expert's rows, accumulated in fp32 whatever ``g_MX``'s dtype
    (a bf16 accumulator rounds once per added row), returned in ``g_MX``'s dtype."""
    expert_of_row = torch.repeat_interleave(
        torch.arange(len(counts_E), device=g_MX.device), counts_E, output_size=len(g_MX)
    )
    acc_dtype = torch.promote_types(g_MX.dtype, torch.float32)
    out = g_MX.new_zeros(len(counts_E), g_MX.shape[1], dtype=acc_dtype)
    return out.index_add_(0, expert_of_row, g_MX.to(acc_dtype)).to(g_MX.dtype)


def _expert_ffn_forward(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    activation: Activation,
    kernel_in: GroupedMatmulKernel,
    kernel_out: GroupedMatmulKernel,
    host_counts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_MD, h_MH, a_MH)``: the output, the pre-activation and the activation."""
    h_MH = grouped_mm_forward(x_MD, w_in, counts_E, kernel_in, host_counts)
    expert_of_row = None
    if b_in is not None:
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts_E), device=x_MD.device), counts_E, output_size=len(x_MD)
        )
        h_MH += b_in[expert_of_row]
    a_MH = _activation_forward(activation, h_MH)
    y_MD = grouped_mm_forward(a_MH, w_out, counts_E, kernel_out, host_counts)
    if b_out is not None:
        y_MD += b_out[expert_of_row]
    return y_MD, h_MH, a_MH


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, counts_E, w_in, b_in, w_out, b_out, activation, kernel_in, kernel_out):  # type: ignore[override]
        # the loop reads the group sizes on the host: once per layer per step, not per product
        loops = GroupedMatmulKernel.LOOP in (kernel_in, kernel_out)
        host_counts = counts_E.tolist() if loops and not torch.compiler.is_compiling() else None
        y_MD, h_MH, a_MH = _expert_ffn_forward(
            x_MD,
            counts_E,
            w_in,
            b_in,
            w_out,
            b_out,
            activation,
            kernel_in,
            kernel_out,
            host_counts,
        )
        ctx.host_counts = host_counts
        ctx.save_for_backward(x_MD, counts_E, w_in, w_out, h_MH, a_MH)
        ctx.activation, ctx.kernel_in, ctx.kernel_out = activation, kernel_in, kernel_out
        ctx.has_bias = b_in is not None
        return y_MD

    @staticmethod
    def backward(ctx, grad_y_MD):  # type: ignore[override]
        x_MD, counts_E, w_in, w_out, h_MH, a_MH = ctx.saved_tensors
        grad_y_MD = grad_y_MD.contiguous()
        loops = ctx.host_counts is None and grouped_matmul.weight_grad_by_loop(x_MD)
        if loops and not torch.compiler.is_compiling():  # the weight gradients loop: read once
            ctx.host_counts = counts_E.tolist()
        need_x, _, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:6]
        grad_w_out = grad_b_out = grad_w_in = grad_b_in = grad_x = None
        if need_w_out:
            grad_w_out = grouped_mm_weight_grad(
                a_MH, grad_y_MD, counts_E, ctx.kernel_out, ctx.host_counts
            )
        if need_b_out:
            grad_b_out = _sum_rows_per_expert(grad_y_MD, counts_E)
        grad_a_MH = grouped_mm_forward(
            grad_y_MD, w_out.transpose(1, 2), counts_E, ctx.kernel_out, ctx.host_counts
        )
        grad_h_MH = activation_backward(ctx.activation, h_MH, grad_a_MH)
        del grad_a_MH
        if need_w_in:
            grad_w_in = grouped_mm_weight_grad(
                x_MD, grad_h_MH, counts_E, ctx.kernel_in, ctx.host_counts
            )
        if need_b_in:
            grad_b_in = _sum_rows_per_expert(grad_h_MH, counts_E)
        if need_x:
            grad_x = grouped_mm_forward(
                grad_h_MH, w_in.transpose(1, 2), counts_E, ctx.kernel_in, ctx.host_counts
            )
        return grad_x, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def expert_ffn(
    x_MD: torch.Tensor,
    counts_E: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EHD: torch.Tensor,
    *,
    b_in_EH: torch.Tensor | None = None,
    b_out_ED: torch.Tensor | None = None,
    activation: Activation = Activation.SWIGLU,
    kernel: GroupedMatmulKernel | str = GroupedMatmulKernel.AUTO,
) -> torch.Tensor:
    """All experts' FFNs on expert-sorted rows.

    Args:
        x_MD: ``(M, D)`` rows, expert ``e`` owning ``counts_E[e]`` consecutive rows.
        counts_E: ``(E,)`` integer counts summing to M.
        w_in_EDH: ``(E, D, H or 2H)``; w_out_EHD: ``(E, H, D)``.
        b_in_EH, b_out_ED: optional biases (both or neither).
        activation: expert activation.
        kernel: grouped-matmul kernel (``auto``: see ``grouped_matmul.grouped_mm_available``).

    Under ``torch.autocast`` the FFN runs in the autocast dtype (the inputs, weights and biases
    are cast before the autograd function; their gradients come back in their own dtypes).

    Returns:
        ``(M, D)``, in the autocast dtype under autocast, else in ``x_MD``'s dtype.
    """
    device = x_MD.device
    # under autocast: rows, weights and biases in the autocast dtype, cast outside the autograd
    # function so fp32 master weights get fp32 gradients (grouped_mm has no autocast kernel)
    x_MD, w_in_EDH, w_out_EHD, b_in_EH, b_out_ED = autocast_operands(  # type: ignore[assignment]
        device, x_MD, w_in_EDH, w_out_EHD, b_in_EH, b_out_ED
    )
    for name, w in (("w_in_EDH", w_in_EDH), ("w_out_EHD", w_out_EHD)):
        if x_MD.dtype != w.dtype:
            raise TypeError(f"x dtype {x_MD.dtype} differs from {name} dtype {w.dtype}")
    if (b_in_EH is None) != (b_out_ED is None):
        raise ValueError("b_in_EH and b_out_ED must be given together")
    E = w_in_EDH.shape[0]
    kernel_in = resolve_kernel(
        kernel, x_MD.dtype, w_in_EDH.shape[1], w_in_EDH.shape[2], device=device, num_groups=E
    )
    kernel_out = resolve_kernel(
        kernel, x_MD.dtype, w_out_EHD.shape[1], w_out_EHD.shape[2], device=device, num_groups=E
    )
    args = (
        x_MD,
        counts_E,
        w_in_EDH,
        b_in_EH,
        w_out_EHD,
        b_out_ED,
        Activation(activation),
        kernel_in,
        kernel_out,
    )
    with autocast_off(device):
        if not torch.is_grad_enabled():  # inference: no autograd node, nothing saved
            return _expert_ffn_forward(*args)[0]
        return _ExpertFFN.apply(*args)
