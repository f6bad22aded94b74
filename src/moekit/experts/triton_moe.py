"""Fused Triton kernels for the routed experts: gather, both grouped GEMMs, the activation and
the weighted scatter-add, forward and backward (``ExpertConfig.kernel = "triton"``).

Legend: T = tokens, M = kept assignments sorted by expert, D = d_model, H = expert hidden
width (``2H`` columns of ``w_in`` for gated activations), E = experts, K = the product's inner
width.

Forward (two kernels, no permuted copy of the tokens, no separate combine):

1. ``a_MH = act(x[token_M] @ w_in[e])``: the token rows are gathered in the first GEMM's loads;
   a gated activation computes the gate and up tiles in one program and writes ``a`` in the
   epilogue (and the pre-activation ``h``, which the backward reads);
2. ``y[token_M] += w_M · (a_MH @ w_out[e])``: the router weight and the scatter-add are the
   second GEMM's epilogue (float32 atomic adds; with ``torch.use_deterministic_algorithms``
   the rows are written and summed in slot order instead, bitwise reproducible).

Backward: ``u = g[token_M] @ w_out[e]^T`` (gathered), ``dw_M = Σ a·u``, ``dh = act'(h, w·u)``,
then ``dx[token_M] += dh @ w_in[e]^T`` (scatter epilogue) and the weight gradients
``dw_out[e] = a_e^T (w·g[token])_e`` and ``dw_in[e] = x[token]_e^T dh_e`` (gathers in the loads,
nothing permuted materialised); an expert with no rows gets an exact zero gradient.

The grid is a fixed upper bound of row tiles (``ceil(M / BM) + E``), each program finding its
expert and rows from device tensors: no host sync. On the CPU the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them against the
plain PyTorch path; :func:`triton_available` says where they run.
"""

from __future__ import annotations

import os

import torch

from moekit.experts.activations import Activation, activation_backward

#: activations the kernels compute in their epilogue (the others take the PyTorch path)
TRITON_ACTIVATIONS = {
    Activation.SWIGLU: 1,
    Activation.GEGLU: 2,
    Activation.GEGLU_TANH: 3,
    Activation.RELU: 4,
    Activation.GELU: 5,
    Activation.SILU: 6,
    Activation.RELU2: 7,
}
_GATED = (Activation.SWIGLU, Activation.GEGLU, Activation.GEGLU_TANH)
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


try:
    import triton
    import triton.language as tl
except ImportError:  # an optional extra: the kernels below are defined only with it
    triton = None


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """``(whether the Triton kernels run on device, why not)``: on CUDA with ``triton``
    installed, or on the CPU under ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False, "triton is not installed (pip install 'moekit[triton]')"
    kind = torch.device(device).type
    if kind == "cuda":
        return True, ""
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"the Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU), not {kind}"


if triton is not None:

    @triton.jit
    def activate(x, ACT: tl.constexpr):
        if ACT == 1 or ACT == 6:  # silu
            return x * tl.sigmoid(x)
        if ACT == 2 or ACT == 5:  # exact GELU
            return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        if ACT == 3:  # GELU, tanh approximation: tanh(y) = 2 sigmoid(2y) - 1
            y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            return 0.5 * x * (2.0 * tl.sigmoid(2.0 * y))
        if ACT == 4:
            return tl.maximum(x, 0.0)
        if ACT == 7:
            r = tl.maximum(x, 0.0)
            return r * r
        return x

    @triton.jit
    def grouped_gemm(
        a_ptr, a_rows_ptr, b_ptr, out_ptr, out_rows_ptr, scale_ptr, h_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        K, N, H_COLS,
        stride_a, stride_be, stride_bk, stride_bn, stride_out, stride_h,
        GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr,
        ACT: tl.constexpr, GATED: tl.constexpr, WRITE_H: tl.constexpr,
        UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """One (row tile of one expert, column block): ``A[rows] @ B[e]`` with the row gather,
        the activation (gated: gate and up blocks), the per-row scale and the scatter-add."""
        tile = tl.program_id(0)
        expert = tl.load(tile_expert_ptr + tile)
        if expert < 0:
            return
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(offsets_ptr + expert + 1)
        rows = start + tl.arange(0, BM)
        row_ok = rows < end
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        col_ok = cols < N
        src = tl.load(a_rows_ptr + rows, mask=row_ok, other=0) if GATHER else rows
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a = tl.load(
                a_ptr + src[:, None].to(tl.int64) * stride_a + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if UPCAST:  # the interpreter's dot mishandles bfloat16 operands
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b)
            if GATED:  # the up block, H_COLS columns further
                b_up = tl.load(
                    b_base + ks[:, None] * stride_bk + (cols[None, :] + H_COLS) * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                acc_up += tl.dot(a, b_up)
        ok = row_ok[:, None] & col_ok[None, :]
        if WRITE_H:  # the pre-activation, for the backward
            h_at = h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :]
            tl.store(h_at, acc.to(h_ptr.dtype.element_ty), mask=ok)
            if GATED:
                tl.store(h_at + H_COLS, acc_up.to(h_ptr.dtype.element_ty), mask=ok)
        out = activate(acc, ACT)
        if GATED:
            out = out * acc_up
        if SCALE:
            out = out * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if SCATTER:
            dest = tl.load(out_rows_ptr + rows, mask=row_ok, other=0)
            tl.atomic_add(
                out_ptr + dest[:, None].to(tl.int64) * stride_out + cols[None, :], out, mask=ok
            )
        else:
            tl.store(
                out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=ok,
            )

    @triton.jit
    def weight_grad(
        a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, scale_ptr, out_ptr, offsets_ptr,
        KA, NB, stride_a, stride_b, stride_oe, stride_ok,
        GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr,
        UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """``out[e] = A[rows_e]^T @ (s · B[rows_e])`` for one (expert, row block, column
        block), both operands gathered in the loads; an expert without rows writes zeros."""
        expert = tl.program_id(0)
        ks = tl.program_id(1) * BK + tl.arange(0, BK)
        ns = tl.program_id(2) * BN + tl.arange(0, BN)
        k_ok, n_ok = ks < KA, ns < NB
        start = tl.load(offsets_ptr + expert)
        end = tl.load(offsets_ptr + expert + 1)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        for r0 in range(start, end, BM):
            rows = r0 + tl.arange(0, BM)
            row_ok = rows < end
            src_a = tl.load(a_rows_ptr + rows, mask=row_ok, other=0) if GATHER_A else rows
            src_b = tl.load(b_rows_ptr + rows, mask=row_ok, other=0) if GATHER_B else rows
            a = tl.load(
                a_ptr + src_a[:, None].to(tl.int64) * stride_a + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + src_b[:, None].to(tl.int64) * stride_b + ns[None, :],
                mask=row_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if SCALE:
                s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
                b = (b.to(tl.float32) * s.to(tl.float32)[:, None]).to(b.dtype)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(tl.trans(a), b)
        out = out_ptr + expert.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + ns[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(counts_E: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert of each row tile or -1, its first row, expert row offsets (E + 1,))`` over a
    fixed grid of ``ceil(rows / BLOCK_M) + E`` tiles, computed on the device (no host sync)."""
    E = counts_E.numel()
    counts = counts_E.to(torch.int64)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=counts.device)
    offsets[1:] = counts.cumsum(0)
    tiles_E = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tiles_E.cumsum(0)
    grid = (rows + BLOCK_M - 1) // BLOCK_M + E
    tile = torch.arange(grid, device=counts.device)
    expert = torch.searchsorted(ends, tile, right=True)
    valid = expert < E
    safe = expert.clamp(max=E - 1)
    start = offsets[safe] + (tile - (ends[safe] - tiles_E[safe])) * BLOCK_M
    return torch.where(valid, expert, -1).to(torch.int32), start.to(torch.int32), offsets


def _gemm(
    a: torch.Tensor,
    b_ENK: torch.Tensor,
    tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    n: int,
    gather: torch.Tensor | None = None,
    scatter_to: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale_M: torch.Tensor | None = None,
    activation: Activation | None = None,
    keep_h: bool = False,
    rows: int,
    b_strides: tuple[int, int, int],
    k: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One grouped GEMM launch; returns ``(rows (rows, n) or the scatter target, h or None)``."""
    tile_expert, tile_start, offsets = tiles
    gated = activation in _GATED
    code = 0 if activation is None else TRITON_ACTIVATIONS[activation]
    if scatter_to is not None:
        out, out_rows = scatter_to
    else:
        out, out_rows = a.new_empty(rows, n), tile_start  # out_rows unused
    h = a.new_empty(rows, 2 * n if gated else n) if keep_h else None
    dummy = tile_start
    grid = (tile_expert.numel(), triton.cdiv(n, BLOCK_N))
    grouped_gemm[grid](
        a, gather if gather is not None else dummy, b_ENK, out, out_rows,
        scale_M if scale_M is not None else out, h if h is not None else out,
        tile_expert, tile_start, offsets,
        k, n, n,
        a.stride(0), *b_strides, out.stride(0), h.stride(0) if h is not None else 0,
        GATHER=gather is not None, SCATTER=scatter_to is not None, SCALE=scale_M is not None,
        ACT=code, GATED=gated, WRITE_H=keep_h, UPCAST=_interpreting(),
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )  # fmt: skip
    return out, h


def _weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_shape: tuple[int, int, int],
    gather_a: torch.Tensor | None = None,
    gather_b: torch.Tensor | None = None,
    scale_M: torch.Tensor | None = None,
) -> torch.Tensor:
    E, KA, NB = out_shape
    out = a.new_empty(out_shape)
    dummy = offsets
    grid = (E, triton.cdiv(KA, BLOCK_K), triton.cdiv(NB, BLOCK_N))
    weight_grad[grid](
        a, gather_a if gather_a is not None else dummy, b,
        gather_b if gather_b is not None else dummy,
        scale_M if scale_M is not None else a, out, offsets,
        KA, NB, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        GATHER_A=gather_a is not None, GATHER_B=gather_b is not None, SCALE=scale_M is not None,
        UPCAST=_interpreting(), BM=BLOCK_M, BK=BLOCK_K, BN=BLOCK_N,
    )  # fmt: skip
    return out


def _combine(rows_MD: torch.Tensor, token_M: torch.Tensor, T: int) -> torch.Tensor:
    """Deterministic scatter-add: rows summed per token in a fixed order (float32)."""
    order = torch.argsort(token_M, stable=True)
    out = rows_MD.new_zeros(T, rows_MD.shape[1], dtype=torch.float32)
    return out.index_add_(0, token_M[order], rows_MD[order].float())


class _TritonMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_M, w_in, w_out, token_M, counts_E, activation):  # type: ignore[override]
        T, D = x_TD.shape
        M = token_M.numel()
        H = w_out.shape[1]
        x_TD, w_in, w_out = x_TD.contiguous(), w_in.contiguous(), w_out.contiguous()
        tiles = _tiles(counts_E, M)
        token32 = token_M.to(torch.int32)
        a_MH, h = _gemm(
            x_TD, w_in, tiles, n=H, gather=token32, activation=activation, keep_h=True,
            rows=M, b_strides=(w_in.stride(0), w_in.stride(1), w_in.stride(2)), k=D,
        )  # fmt: skip
        deterministic = torch.are_deterministic_algorithms_enabled()
        w_strides = (w_out.stride(0), w_out.stride(1), w_out.stride(2))
        if deterministic:
            rows, _ = _gemm(
                a_MH, w_out, tiles, n=D, scale_M=weights_M, rows=M, b_strides=w_strides, k=H
            )
            y = _combine(rows, token_M, T)
        else:
            y = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
            _gemm(
                a_MH, w_out, tiles, n=D, scatter_to=(y, token32), scale_M=weights_M,
                rows=M, b_strides=w_strides, k=H,
            )  # fmt: skip
        ctx.save_for_backward(x_TD, weights_M, w_in, w_out, token32, h, a_MH, *tiles)
        ctx.activation, ctx.T = activation, T
        return y.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        x_TD, weights_M, w_in, w_out, token32, h, a_MH, *tiles = ctx.saved_tensors
        tiles = tuple(tiles)
        g = grad_y_TD.contiguous().to(x_TD.dtype)
        M, D = token32.numel(), x_TD.shape[1]
        H = w_out.shape[1]
        # u = g[token] @ w_out[e]^T: w_out (E, H, D) read as (E, D, H) by its strides
        u_MH, _ = _gemm(
            g, w_out, tiles, n=H, gather=token32, rows=M,
            b_strides=(w_out.stride(0), w_out.stride(2), w_out.stride(1)), k=D,
        )  # fmt: skip
        grad_weights = (a_MH.float() * u_MH.float()).sum(-1).to(weights_M.dtype)
        grad_a = (u_MH.float() * weights_M.float().unsqueeze(-1)).to(h.dtype)
        grad_h = activation_backward(ctx.activation, h, grad_a)
        offsets = tiles[2]
        E = w_in.shape[0]
        grad_w_out = _weight_grad(
            a_MH, g, offsets, out_shape=(E, H, D), gather_b=token32, scale_M=weights_M
        )
        grad_w_in = _weight_grad(
            x_TD, grad_h, offsets, out_shape=(E, D, grad_h.shape[1]), gather_a=token32
        )
        in_strides = (w_in.stride(0), w_in.stride(2), w_in.stride(1))  # (E, 2H, D) view
        if torch.are_deterministic_algorithms_enabled():
            rows, _ = _gemm(
                grad_h, w_in, tiles, n=D, rows=M, b_strides=in_strides, k=grad_h.shape[1]
            )
            grad_x = _combine(rows, token32.long(), ctx.T)
        else:
            grad_x = torch.zeros(ctx.T, D, dtype=torch.float32, device=g.device)
            _gemm(
                grad_h, w_in, tiles, n=D, scatter_to=(grad_x, token32), rows=M,
                b_strides=in_strides, k=grad_h.shape[1],
            )  # fmt: skip
        return grad_x.to(x_TD.dtype), grad_weights, grad_w_in, grad_w_out, None, None, None


def triton_moe(
    x_TD: torch.Tensor,
    token_idx_M: torch.Tensor,
    weights_M: torch.Tensor,
    counts_E: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EHD: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """``y_TD = Σ_rows w_M · expert_e(x[token_M])``: the routed experts from token rows to the
    combined output in two fused kernels (see the module docstring).

    Args:
        x_TD: ``(T, D)`` token inputs (padding already zeroed).
        token_idx_M: ``(M,)`` source token of each kept row, rows grouped by expert.
        weights_M: ``(M,)`` combine weights (differentiable).
        counts_E: ``(E,)`` rows of each expert (summing to M).
        w_in_EDH: ``(E, D, H or 2H)`` first projection (``[gate | up]`` when gated).
        w_out_EHD: ``(E, H, D)``.
        activation: one of :data:`TRITON_ACTIVATIONS`.

    Returns:
        ``(T, D)`` in ``x_TD``'s dtype (accumulated in float32).
    """
    if activation not in TRITON_ACTIVATIONS:
        raise ValueError(
            f"the Triton kernels compute {', '.join(a.value for a in TRITON_ACTIVATIONS)}, "
            f"not {activation.value}"
        )
    return _TritonMoE.apply(x_TD, weights_M, w_in_EDH, w_out_EHD, token_idx_M, counts_E, activation)
