"""Liger-Kernel's fused MoE as an expert backend (``ExpertConfig.kernel = "liger"``).

``liger_kernel.ops.fused_moe.LigerFusedMoEFunction`` (Liger-Kernel 0.8.5, Triton, forward
and backward) gathers the token rows into its first grouped GEMM, computes SwiGLU in that
GEMM's epilogue, runs the down projection and sums each token's K rows with their router
weights; its backward recomputes the down projection's input gradient instead of caching the
expert outputs. It plans its own expert grouping from the ``(T, K)`` expert indices (three
small kernels and one host read of the tile count), so this adapter hands it the routing as
``(T, K)`` indices and weights rebuilt from moekit's dispatch plan: a slot the plan did not keep
(a capacity drop, a zero-computation expert) gets weight 0 and expert 0, so it adds nothing
and gets no gradient, and padding rows arrive zeroed.

Layouts: Liger takes ``gate_up_proj (E, 2I, D)`` and ``down_proj (E, D, I)``; moekit's bank
stores ``w_in (E, D, 2I)`` and ``w_out (E, I, D)``, so the adapter passes transposed views and
Liger makes them contiguous, a copy of the expert weights per call that is part of this
backend's measured time. Gate before up in both. SwiGLU only, no expert biases.

Reproducibility: Liger's backward sums the router-weight gradient over its column tiles with
atomic adds in the output's dtype (bf16 under autocast), so that gradient is neither bitwise
reproducible nor accumulated in fp32; moekit's ``triton`` backend has a deterministic mode and
accumulates in fp32.

Like moekit's own kernels it runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (how the
test suite checks it against the PyTorch path). Install with ``pip install 'moekit[liger]'``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moekit.experts.activations import Activation

#: the one activation Liger's kernels compute
LIGER_ACTIVATIONS = (Activation.SWIGLU,)


def liger_available() -> tuple[bool, str]:
    """``(whether liger_kernel is installed, why not)``."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed (pip install 'moekit[liger]')"
    return True, ""


def liger_moe(
    x_TD: torch.Tensor,
    token_idx_M: torch.Tensor,
    assignment_idx_M: torch.Tensor,
    weights_M: torch.Tensor,
    counts_E: torch.Tensor,
    top_k: int,
    w_in_EDH: torch.Tensor,
    w_out_EHD: torch.Tensor,
) -> torch.Tensor:
    """``y_TD = Σ_rows w_M · swiglu_e(x[token_M])`` through Liger's fused MoE.

    Args:
        x_TD: ``(T, D)`` token inputs (padding already zeroed).
        token_idx_M: ``(M,)`` source token of each kept row, rows grouped by expert (its
            length is M; Liger regroups from the indices itself).
        assignment_idx_M: ``(M,)`` each row's flat slot ``t * K + j``.
        weights_M: ``(M,)`` combine weights (differentiable).
        counts_E: ``(E,)`` rows of each expert, in ``token_idx_M``'s order (summing to M).
        top_k: K, the slots per token.
        w_in_EDH: ``(E, D, 2I)`` ``[gate | up]``.
        w_out_EHD: ``(E, I, D)``.

    Returns:
        ``(T, D)`` in ``x_TD``'s dtype.
    """
    if x_TD.device.type == "cpu":
        # Triton's interpreter has no driver to time the autotuner's candidates: one config
        # each (read when liger_kernel is first imported)
        os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    from liger_kernel.ops.fused_moe import (  # noqa: PLC0415 (optional: liger-kernel)
        LigerFusedMoEFunction,
    )

    T, M, E = x_TD.shape[0], token_idx_M.shape[0], counts_E.shape[0]
    expert_M = torch.repeat_interleave(torch.arange(E, device=x_TD.device), counts_E, output_size=M)
    expert_A = torch.zeros(T * top_k, dtype=torch.int32, device=x_TD.device)
    expert_A[assignment_idx_M] = expert_M.to(torch.int32)
    weights_A = weights_M.new_zeros(T * top_k).index_put((assignment_idx_M,), weights_M)
    return LigerFusedMoEFunction.apply(
        x_TD,
        w_in_EDH.transpose(1, 2),
        w_out_EHD.transpose(1, 2),
        expert_A.view(T, top_k),
        weights_A.view(T, top_k).to(x_TD.dtype),
    )
