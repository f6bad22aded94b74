"""Grouped matrix multiply kernels: rows sorted by expert times a stacked per-expert weight.

Legend: M = rows (token-expert assignments, sorted by expert), K = input width, N = output
width, E = experts.

``grouped_mm_forward(x_MK, w_EKN, counts_E, kernel)`` gives ``y[rows of e] = x[rows of e] @
w[e]``; ``grouped_mm_weight_grad`` gives ``gw[e] = x[rows of e]^T @ g[rows of e]``. Two kernels:
``torch.nn.functional.grouped_mm`` (one call, float32/bfloat16/float16 when present) and a loop
of ``torch.mm`` over contiguous slices (float64, older torch, or when asked). They carry no
autograd of their own: ``moekit.experts.fused_ffn`` uses them in the expert FFN's one autograd
function, whose backward never indexes the stacked weight in a differentiable loop (that costs
O(E^2) in autograd) and hands the kernel a contiguous gradient (``grouped_mm`` rejects
zero-stride gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import cast

import torch
import torch.nn.functional as F

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# CUTLASS's grouped GEMM takes fewer than 1024 groups (GroupMM.cu).
MAX_CUDA_GROUPS = 1023


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


class GroupedMatmulKernel(str, Enum):
    """Which kernel runs the per-expert products."""

    AUTO = "auto"  # grouped_mm where it is fast and supported for the dtype and device
    GROUPED_MM = "grouped_mm"
    LOOP = "loop"
    # the fused Triton kernels for the whole routed FFN (moekit.experts.backends); the grouped
    # products of what they do not cover run as under auto
    TRITON = "triton"
    # Liger-Kernel's fused MoE (moekit.experts.liger_moe), the same way
    LIGER = "liger"


_FUSED = (GroupedMatmulKernel.TRITON, GroupedMatmulKernel.LIGER)


def grouped_mm_available(
    dtype: torch.dtype,
    k: int = 16,
    n: int = 16,
    *,
    device: torch.device | str | None = None,
    num_groups: int | None = None,
) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` is a good choice here for ``dtype`` with inner
    width ``k`` and output width ``n`` on ``device`` (default: the CPU): it runs at all
    (:func:`grouped_mm_supported`) and

    * CUDA: only bfloat16 on compute capability 9.x or 10.x (Hopper, Blackwell), where torch
      runs CUTLASS without a host sync. Elsewhere torch >= 2.9 falls back to a host sync plus one
      GEMM per group (torch 2.8 raises), which moekit's own loop does as well.
    * CPU: torch >= 2.9 (2.8 had no CPU kernel).
    """
    if not grouped_mm_supported(dtype, k, n, device=device, num_groups=num_groups):
        return False
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return dtype is torch.bfloat16 and major in (9, 10)
    if device.type == "cpu":
        return _torch_version() >= (2, 9)
    return False  # mps and others: the loop


def resolve_kernel(
    kernel: GroupedMatmulKernel | str,
    dtype: torch.dtype,
    k: int,
    n: int,
    *,
    device: torch.device | str | None = None,
    num_groups: int | None = None,
) -> GroupedMatmulKernel:
    """The kernel to run: ``auto`` becomes ``grouped_mm`` where :func:`grouped_mm_available`
    says so and ``loop`` elsewhere; an explicit ``grouped_mm`` that is not supported raises."""
    kernel = GroupedMatmulKernel(kernel)
    if kernel in _FUSED:  # the products the fused kernels do not cover
        kernel = GroupedMatmulKernel.AUTO
    if kernel is GroupedMatmulKernel.LOOP:
        return kernel
    if kernel is GroupedMatmulKernel.AUTO:
        available = grouped_mm_available(dtype, k, n, device=device, num_groups=num_groups)
        return GroupedMatmulKernel.GROUPED_MM if available else GroupedMatmulKernel.LOOP
    if not grouped_mm_supported(dtype, k, n, device=device, num_groups=num_groups):
        raise ValueError(
            f"kernel='grouped_mm' is not available for dtype {dtype} with widths {k}x{n} "
            f"and {num_groups} groups on {device or 'cpu'} in torch {torch.__version__} "
            "(needs float32/bfloat16/float16, 16-byte row strides and, on CUDA, fewer than "
            "1024 groups); use kernel='auto' or 'loop'"
        )
    return kernel


def grouped_mm_supported(
    dtype: torch.dtype,
    k: int,
    n: int,
    *,
    device: torch.device | str | None = None,
    num_groups: int | None = None,
) -> bool:
    """Whether ``grouped_mm`` runs at all (fast or through torch's fallback) for these
    operands: what an explicit ``kernel='grouped_mm'`` needs."""
    if _grouped_mm is None or dtype not in _GROUPED_MM_DTYPES:
        return False
    itemsize = dtype.itemsize
    if (k * itemsize) % 16 or (n * itemsize) % 16:
        return False
    del num_groups  # more groups than one call takes run in chunks (_chunked)
    return True


def max_groups_per_call(device: torch.device) -> int | None:
    """The most groups one ``grouped_mm`` call takes on ``device`` (``None``: no limit): CUDA's
    CUTLASS kernel takes fewer than 1024; more experts run as several calls
    (:func:`_chunked`), not as the per-expert loop."""
    return MAX_CUDA_GROUPS if device.type == "cuda" else None


def _chunked(
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    counts_E: torch.Tensor,
    limit: int,
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Run ``call(weights[lo:hi], offs)`` for chunks of at most ``limit`` groups, without a host
    sync: a chunk after the first takes the rows before it as one extra leading group (expert
    ``lo - 1``'s weights; that group's result is discarded), so its offsets are a slice of the
    device's cumulative counts. The price is that leading group's products: with 2 chunks
    (1024 to 2045 experts) about half the rows once more. Returns ``(lo, hi, result, offs)``
    per chunk, ``offs`` the chunk's int32 cumulative row ends, leading group included."""
    ends_E = _offsets(counts_E)
    E = counts_E.shape[0]
    out = []
    lo = 0
    while lo < E:
        first = max(lo - 1, 0)  # the leading group (rows before the chunk), if any
        hi = min(E, first + limit)
        offs = ends_E[first:hi]
        out.append((lo, hi, call(weights[first:hi], offs), offs))
        lo = hi
    return out


def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    # grouped_mm wants int32 cumulative group ends.
    return torch.cumsum(counts_E, dim=0, dtype=torch.int32)


def grouped_mm_forward(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts_E: torch.Tensor,
    kernel: GroupedMatmulKernel,
    host_counts: list[int] | None = None,
) -> torch.Tensor:
    """``y_MN`` with expert e's rows times ``w_EKN[e]`` (no autograd); ``kernel`` resolved.
    ``host_counts``: ``counts_E`` already read to the host, for the loop (which otherwise reads
    them itself: a host sync on CUDA)."""
    kernel = GroupedMatmulKernel(kernel)
    looped = kernel is GroupedMatmulKernel.LOOP and host_counts is not None
    if looped and not torch.compiler.is_compiling():
        return _loop_mm(x_MK, w_EKN, cast(list, host_counts))
    op = _grouped_mm_op if torch.compiler.is_compiling() else _grouped_mm_impl
    return op(x_MK, w_EKN, counts_E, kernel.value)


def grouped_mm_weight_grad(
    x_MK: torch.Tensor,
    g_MN: torch.Tensor,
    counts_E: torch.Tensor,
    kernel: GroupedMatmulKernel,
    host_counts: list[int] | None = None,
) -> torch.Tensor:
    """``gw_EKN[e] = x[rows of e]^T @ g[rows of e]`` (zero for empty experts; no autograd).

    On the CPU the loop is used whatever ``kernel`` says: ``grouped_mm`` with a transposed 2-D
    left operand measured 5x slower than the loop of ``torch.mm`` here (torch 2.13, 64 experts of
    128 rows, 512x2048: 546 ms against 106 ms).
    """
    kernel = GroupedMatmulKernel(kernel)
    loops = kernel is GroupedMatmulKernel.LOOP or weight_grad_by_loop(x_MK)
    if loops and host_counts is not None and not torch.compiler.is_compiling():
        return _loop_weight_grad(x_MK, g_MN, host_counts)
    op = _weight_grad_op if torch.compiler.is_compiling() else _weight_grad_impl
    return op(x_MK, g_MN, counts_E, kernel.value)


# Under torch.compile the kernels are custom operators: opaque, with shape-only fake versions
# (the group sizes are data, ``counts_E.tolist()`` in the loop, and grouped_mm's own fake
# version insists on bf16 inputs in torch 2.13, so tracing through them would break the graph
# or fail). Eager mode calls them directly: the custom-operator wrapper measured 1.2x slower
# on a 64-expert layer's forward+backward here.


def _grouped_mm_impl(
    x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, kernel: str
) -> torch.Tensor:
    if kernel == GroupedMatmulKernel.GROUPED_MM.value:
        assert _grouped_mm is not None  # resolve_kernel checked availability
        limit = max_groups_per_call(x_MK.device)
        if limit is None or counts_E.shape[0] <= limit:
            return _grouped_mm(x_MK, w_EKN, offs=_offsets(counts_E))
        y_MN = x_MK.new_zeros(x_MK.shape[0], w_EKN.shape[-1])
        rows_M = torch.arange(x_MK.shape[0], device=x_MK.device, dtype=torch.int32)

        def forward(w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
            return cast(Callable, _grouped_mm)(x_MK, w, offs=offs)

        for lo, _hi, y_chunk, offs in _chunked(forward, w_EKN, counts_E, limit):
            first_row = offs[0] if lo > 0 else offs.new_zeros(())
            inside_M = (rows_M >= first_row) & (rows_M < offs[-1])
            y_MN = torch.where(inside_M.unsqueeze(1), y_chunk, y_MN)
        return y_MN
    return _loop_mm(x_MK, w_EKN, counts_E.tolist())


def _loop_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    y_MN = x_MK.new_empty(x_MK.shape[0], w_EKN.shape[-1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            torch.mm(x_MK[start : start + count], w_EKN[e], out=y_MN[start : start + count])
        start += count
    return y_MN


_grouped_mm_op = torch.library.custom_op("moekit::grouped_mm", mutates_args=())(_grouped_mm_impl)


@_grouped_mm_op.register_fake
def _(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, kernel: str):
    return x_MK.new_empty(x_MK.shape[0], w_EKN.shape[-1])


def weight_grad_by_loop(x_MK: torch.Tensor) -> bool:
    """Whether the weight gradient loops over experts even when ``grouped_mm`` is chosen: on
    the CPU, where the loop measured 5x faster (see :func:`grouped_mm_weight_grad`)."""
    return x_MK.device.type == "cpu"


def empty_groups_keep_garbage(device: torch.device) -> bool:
    """Whether ``grouped_mm``'s weight gradient leaves whatever was in memory for groups with
    no rows: Blackwell (compute capability 10.x; pytorch issue 172439), where moekit zeroes
    those experts' gradients itself."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 10


def _weight_grad_impl(
    x_MK: torch.Tensor, g_MN: torch.Tensor, counts_E: torch.Tensor, kernel: str
) -> torch.Tensor:
    if kernel == GroupedMatmulKernel.GROUPED_MM.value and not weight_grad_by_loop(x_MK):
        assert _grouped_mm is not None
        limit = max_groups_per_call(x_MK.device)
        if limit is not None and counts_E.shape[0] > limit:
            parts = _chunked(
                lambda _w, offs: cast(Callable, _grouped_mm)(x_MK.t(), g_MN, offs=offs),
                counts_E,  # unused by the call: only its chunk boundaries matter
                counts_E,
                limit,
            )
            gw_EKN = torch.cat([gw if lo == 0 else gw[1:] for lo, _hi, gw, _ in parts])
        else:
            gw_EKN = _grouped_mm(x_MK.t(), g_MN, offs=_offsets(counts_E))
        if empty_groups_keep_garbage(x_MK.device):  # an expert without tokens: exactly zero
            gw_EKN = torch.where((counts_E > 0).view(-1, 1, 1), gw_EKN, 0.0)
        return gw_EKN
    return _loop_weight_grad(x_MK, g_MN, counts_E.tolist())


def _loop_weight_grad(x_MK: torch.Tensor, g_MN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    gw_EKN = x_MK.new_empty(len(counts), x_MK.shape[1], g_MN.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            torch.mm(x_MK[start : start + count].t(), g_MN[start : start + count], out=gw_EKN[e])
        else:
            gw_EKN[e].zero_()
        start += count
    return gw_EKN


_weight_grad_op = torch.library.custom_op("moekit::grouped_mm_weight_grad", mutates_args=())(
    _weight_grad_impl
)


@_weight_grad_op.register_fake
def _(x_MK: torch.Tensor, g_MN: torch.Tensor, counts_E: torch.Tensor, kernel: str):
    return x_MK.new_empty(counts_E.shape[0], x_MK.shape[1], g_MN.shape[1])
