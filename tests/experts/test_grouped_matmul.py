"""The grouped-matmul kernels against per-expert products."""

import pytest
import torch

from moekit.experts.grouped_matmul import (
    GroupedMatmulKernel,
    grouped_mm_available,
    grouped_mm_forward,
    grouped_mm_weight_grad,
    resolve_kernel,
)


def _products(x, w, counts):
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(x[start : start + c] @ w[e])
        start += c
    return torch.cat(out)


def _weight_grads(x, g, counts):
    out, start = [], 0
    for c in counts.tolist():
        out.append(x[start : start + c].t() @ g[start : start + c])
        start += c
    return torch.stack(out)


KERNELS = [GroupedMatmulKernel.LOOP] + (
    [GroupedMatmulKernel.GROUPED_MM] if grouped_mm_available(torch.float32) else []
)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_kernels_match_per_expert_products(kernel, counts):
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8)
    w = torch.randn(4, 8, 4)
    g = torch.randn(int(counts.sum()), 4)
    torch.testing.assert_close(
        grouped_mm_forward(x, w, counts, kernel), _products(x, w, counts), rtol=1e-5, atol=1e-6
    )
    gw = grouped_mm_weight_grad(x, g, counts, kernel)
    torch.testing.assert_close(gw, _weight_grads(x, g, counts), rtol=1e-5, atol=1e-6)
    for e in torch.nonzero(counts == 0).flatten().tolist():  # an empty expert: exactly zero
        assert torch.count_nonzero(gw[e]) == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_transposed_weight_views_work(kernel):
    """The backward multiplies by ``w.transpose(1, 2)`` views."""
    counts = torch.tensor([2, 3])
    g = torch.randn(5, 8)
    w = torch.randn(2, 4, 8)
    torch.testing.assert_close(
        grouped_mm_forward(g, w.transpose(1, 2), counts, kernel),
        _products(g, w.transpose(1, 2), counts),
    )


def test_auto_falls_back_to_loop_for_unaligned_widths_and_float64():
    assert resolve_kernel("auto", torch.float32, 6, 5) is GroupedMatmulKernel.LOOP
    assert resolve_kernel("auto", torch.float64, 16, 16) is GroupedMatmulKernel.LOOP
    if grouped_mm_available(torch.float32):
        assert resolve_kernel("auto", torch.float32, 16, 16) is GroupedMatmulKernel.GROUPED_MM
        with pytest.raises(ValueError, match="16-byte"):
            resolve_kernel("grouped_mm", torch.float32, 6, 5)


def test_unavailable_kernel_is_an_error():
    with pytest.raises(ValueError, match="kernel='grouped_mm'"):
        resolve_kernel("grouped_mm", torch.float64, 16, 16)


@pytest.mark.parametrize(
    ("capability", "dtype", "groups", "expected"),
    [
        ((9, 0), torch.bfloat16, 128, "grouped_mm"),  # Hopper, bf16: CUTLASS, no host sync
        ((10, 0), torch.bfloat16, 64, "grouped_mm"),  # Blackwell
        ((8, 0), torch.bfloat16, 64, "loop"),  # Ampere: torch's fallback syncs per call
        ((9, 0), torch.float32, 64, "loop"),  # fp32: torch's fallback
        ((9, 0), torch.float16, 64, "loop"),
        ((9, 0), torch.bfloat16, 1024, "grouped_mm"),  # in chunks of < 1024 groups
    ],
)
def test_kernel_choice_on_cuda_follows_the_fast_path(
    monkeypatch, capability, dtype, groups, expected
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen = resolve_kernel("auto", dtype, 2048, 768, device="cuda", num_groups=groups)
    assert chosen.value == expected


def test_more_groups_than_one_call_takes_run_in_chunks_not_the_loop(monkeypatch):
    """Issue 32: 1024 or more experts fell to the per-expert loop on CUDA (CUTLASS takes fewer
    than 1024 groups per call). They now run as several grouped_mm calls without a host sync;
    proved on the CPU with a limit of 3 groups per call, against the loop, with empty experts
    at the chunk edges, forward and weight gradient."""
    from moekit.experts import grouped_matmul as gm

    if gm._grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    calls = []
    real = gm._grouped_mm

    def counting(*args, **kwargs):
        calls.append(kwargs["offs"].numel())
        return real(*args, **kwargs)

    monkeypatch.setattr(gm, "_grouped_mm", counting)
    monkeypatch.setattr(gm, "max_groups_per_call", lambda device: 3)
    monkeypatch.setattr(gm, "weight_grad_by_loop", lambda x: False)
    counts = torch.tensor([2, 0, 3, 1, 0, 4, 2])  # 7 experts, some empty
    x = torch.randn(int(counts.sum()), 16)
    w = torch.randn(7, 16, 8)
    g = torch.randn(int(counts.sum()), 8)
    y = gm.grouped_mm_forward(x, w, counts, gm.GroupedMatmulKernel.GROUPED_MM)
    gw = gm.grouped_mm_weight_grad(x, g, counts, gm.GroupedMatmulKernel.GROUPED_MM)
    assert calls and max(calls) <= 3 and len(calls) == 2 * 3  # 3 chunks, forward and backward
    y_loop = gm.grouped_mm_forward(x, w, counts, gm.GroupedMatmulKernel.LOOP)
    gw_loop = gm.grouped_mm_weight_grad(x, g, counts, gm.GroupedMatmulKernel.LOOP)
    torch.testing.assert_close(y, y_loop)
    torch.testing.assert_close(gw, gw_loop)
    assert resolve_kernel("grouped_mm", torch.bfloat16, 16, 16, device="cuda", num_groups=4096)


def test_experts_without_rows_get_exactly_zero_weight_gradients_on_blackwell(monkeypatch):
    """Issue 32: on Blackwell, grouped_mm leaves whatever was in memory as the weight gradient
    of a group without rows (pytorch issue 172439); moekit zeroes those experts. Simulated on
    the CPU: a grouped_mm that leaves garbage there, on a device said to be Blackwell."""
    from moekit.experts import grouped_matmul as gm

    if gm._grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    real = gm._grouped_mm

    def leaves_garbage(a, b, offs):
        out = real(a, b, offs=offs)
        counts = torch.diff(offs, prepend=offs.new_zeros(1))
        return torch.where((counts > 0).view(-1, 1, 1), out, float("nan"))

    monkeypatch.setattr(gm, "_grouped_mm", leaves_garbage)
    monkeypatch.setattr(gm, "weight_grad_by_loop", lambda x: False)
    x, g = torch.randn(6, 8), torch.randn(6, 4)
    counts = torch.tensor([3, 0, 3, 0])
    kernel = GroupedMatmulKernel.GROUPED_MM
    monkeypatch.setattr(gm, "empty_groups_keep_garbage", lambda device: False)
    assert torch.isnan(grouped_mm_weight_grad(x, g, counts, kernel)[1]).all()  # the bug
    monkeypatch.setattr(gm, "empty_groups_keep_garbage", lambda device: True)
    got = grouped_mm_weight_grad(x, g, counts, kernel)
    torch.testing.assert_close(got, _weight_grads(x, g, counts))
    assert torch.equal(got[1], torch.zeros(8, 4)) and torch.equal(got[3], torch.zeros(8, 4))
