import pytest
import torch

from moekit.experts.grouped_matmul import grouped_matmul, grouped_mm_available


def _reference(x, w, counts):
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(x[start : start + c] @ w[e])
        start += c
    return torch.cat(out)


KERNELS = ["loop"] + (["grouped_mm"] if grouped_mm_available(torch.float32) else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_forward_and_backward_match_per_expert_products(kernel, counts):
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    w = torch.randn(4, 8, 4, requires_grad=True)
    g = torch.randn(int(counts.sum()), 4)
    y = grouped_matmul(x, w, counts, kernel)
    y.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = _reference(x, w, counts)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)
    # an expert with no rows gets an exactly-zero weight gradient
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert torch.count_nonzero(gw[e]) == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_stride_gradient_is_accepted(kernel):
    counts = torch.tensor([2, 3])
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(2, 4, 8, requires_grad=True)
    grouped_matmul(x, w, counts, kernel).sum().backward()  # expanded (zero-stride) gradient
    torch.testing.assert_close(w.grad[0], x[:2].detach().t() @ torch.ones(2, 8))


def test_auto_falls_back_to_loop_for_unaligned_widths():
    counts = torch.tensor([2, 1])
    x = torch.randn(3, 6)
    w = torch.randn(2, 6, 5)
    torch.testing.assert_close(grouped_matmul(x, w, counts), _reference(x, w, counts))
    if grouped_mm_available(torch.float32):
        with pytest.raises(ValueError, match="16-byte"):
            grouped_matmul(x, w, counts, "grouped_mm")


def test_float64_gradcheck_uses_loop_kernel():
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_matmul(a, b, counts), (x, w))


def test_dtype_mismatch_and_unavailable_kernel_are_errors():
    counts = torch.tensor([1])
    with pytest.raises(TypeError, match="dtype"):
        grouped_matmul(torch.randn(1, 2), torch.randn(1, 2, 2, dtype=torch.float64), counts)
    with pytest.raises(ValueError, match="kernel='grouped_mm'"):
        grouped_matmul(
            torch.randn(1, 2, dtype=torch.float64),
            torch.randn(1, 2, 2, dtype=torch.float64),
            counts,
            "grouped_mm",
        )
