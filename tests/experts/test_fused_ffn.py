import pytest
import torch

import moekit
from moekit.experts import Activation, ExpertBank
from moekit.experts.fused_ffn import expert_ffn

ACTIVATIONS = [a.value for a in Activation]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_ffn_gradcheck_float64(activation, bias):
    bank = ExpertBank(3, 4, 3, activation=activation, bias=bias).double()
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in bank.parameters()]
    assert torch.autograd.gradcheck(lambda x_, *_: bank(x_, counts), (x, *params))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_ffn_matches_per_expert_math_float32(activation):
    bank = ExpertBank(4, 8, 12, activation=activation, bias=True)
    counts = torch.tensor([3, 0, 6, 1])
    x = torch.randn(10, 8)
    g = torch.randn(10, 8)
    results = []
    for fn in (
        lambda x_: bank(x_, counts),
        lambda x_: torch.cat(
            [bank.forward_one(e, c) for e, c in enumerate(torch.split(x_, counts.tolist()))]
        ),
    ):
        bank.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.backward(g)
        results.append([y.detach(), xi.grad] + [p.grad for p in bank.parameters()])
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the inference path (no autograd node) gives the same output
        torch.testing.assert_close(bank(x, counts), results[1][0], rtol=1e-5, atol=1e-6)


def test_bias_pair_and_dtype_errors():
    w_in, w_out = torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    counts = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="together"):
        expert_ffn(
            torch.randn(2, 4), counts, w_in, w_out, b_in_EH=torch.zeros(2, 6), activation="swiglu"
        )
    with pytest.raises(TypeError, match="w_in_EDH dtype"):
        expert_ffn(torch.randn(2, 4, dtype=torch.float64), counts, w_in, w_out, activation="swiglu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_hand_written_activation_backward_matches_autograd_including_clamps(activation):
    from moekit.experts.activations import activation_backward, apply_activation

    width = 12 if Activation(activation).is_gated else 6
    h = (torch.rand(40, width, dtype=torch.float64) - 0.5) * 20  # crosses GPT-OSS's +-7 clamps
    h.requires_grad_(True)
    out = apply_activation(activation, h)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, h, grad)
    torch.testing.assert_close(activation_backward(activation, h.detach(), grad.clone()), expected)


def test_zero_stride_incoming_gradient_is_accepted():
    """``out.sum().backward()`` hands the backward an expanded (zero-stride) gradient, which
    ``grouped_mm`` rejects; the fused backward makes it contiguous."""
    bank = moekit.ExpertConfig(hidden=16).build(num_experts=2, d_model=16)
    counts = torch.tensor([2, 3])
    x = torch.randn(5, 16, requires_grad=True)
    bank(x, counts).sum().backward()
    expected = torch.autograd.grad(
        torch.cat([bank.forward_one(0, x[:2]), bank.forward_one(1, x[2:])]).sum(), x
    )[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
