"""Mixed precision (CPU autocast follows the same dtype rules as CUDA's): the experts compute in
the autocast dtype with fp32 master gradients, routers stay fp32 when asked, sums accumulate
in fp32, and Soft MoE runs under autocast."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.dispatch.dispatcher import combine
from moekit.dispatch.sort import plan_dispatch
from moekit.experts import grouped_matmul
from moekit.experts.fused_ffn import _sum_rows_per_expert, expert_ffn
from moekit.experts.grouped_linear import grouped_linear


@pytest.fixture
def grouped_mm_dtypes(monkeypatch):
    """Records the dtype of every expert product (grouped_mm or the loop)."""
    seen: list[torch.dtype] = []
    real_forward = grouped_matmul._grouped_mm_impl
    real_grad = grouped_matmul._weight_grad_impl

    def forward(x, w, counts, kernel):
        seen.append(x.dtype)
        assert x.dtype == w.dtype
        return real_forward(x, w, counts, kernel)

    def weight_grad(x, g, counts, kernel):
        seen.append(x.dtype)
        assert x.dtype == g.dtype
        return real_grad(x, g, counts, kernel)

    monkeypatch.setattr(grouped_matmul, "_grouped_mm_impl", forward)
    monkeypatch.setattr(grouped_matmul, "_weight_grad_impl", weight_grad)
    return seen


def _layer(**overrides) -> moekit.MoE:
    torch.manual_seed(0)
    options = dict(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=48))
    options.update(overrides)
    return moekit.MoEConfig(**options).build(d_model=32)


def test_experts_run_in_bf16_under_autocast_with_fp32_master_gradients(grouped_mm_dtypes):
    layer = _layer()
    x = torch.randn(2, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.output.dtype == torch.float32  # the residual stream keeps its dtype
    out.output.square().mean().backward()
    assert grouped_mm_dtypes and set(grouped_mm_dtypes) == {torch.bfloat16}
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert p.grad.dtype == torch.float32, name
    assert x.grad is not None and x.grad.dtype == torch.float32

    # and the result is the fp32 layer's up to bf16 rounding (same routes: router stays fp32)
    reference = _layer()
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference(x_ref)
    expected.output.square().mean().backward()
    assert torch.equal(out.routing.expert_idx_TK, expected.routing.expert_idx_TK)
    torch.testing.assert_close(out.output, expected.output, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(
        layer.experts.w_in_EDH.grad, reference.experts.w_in_EDH.grad, rtol=5e-2, atol=5e-3
    )


def test_router_logits_and_losses_stay_fp32_under_autocast():
    layer = _layer(aux_loss=moekit.AuxLossConfig(switch=0.01, z_loss=0.001))
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.routing.logits_TE.dtype == torch.float32
    assert out.routing.probs_TE.dtype == torch.float32
    assert out.routing.weights_TK.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    # the logits equal the fp32 computation exactly (no bf16 rounding anywhere)
    with torch.no_grad():
        expected = x @ layer.router.weight_ED.t()
    torch.testing.assert_close(out.routing.logits_TE, expected, rtol=1e-6, atol=1e-6)


def test_router_float32_false_follows_autocast():
    layer = _layer(router=moekit.RouterConfig(float32=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(8, 32))
    assert out.routing.logits_TE.dtype == torch.bfloat16


def test_soft_moe_under_autocast(grouped_mm_dtypes):
    torch.manual_seed(0)
    layer = moekit.MoEConfig(
        num_experts=4,
        top_k=1,
        router=moekit.RouterConfig(kind="soft", slots_per_expert=2),
        experts=moekit.ExpertConfig(hidden=32),
    ).build(d_model=32)
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.output.sum().backward()
    assert out.output.shape == x.shape and torch.isfinite(out.output).all()
    assert set(grouped_mm_dtypes) == {torch.bfloat16}
    assert layer.experts.w_in_EDH.grad.dtype == torch.float32
    expected = layer(x.detach())
    torch.testing.assert_close(out.output.float(), expected.output, rtol=5e-2, atol=5e-2)


def test_grouped_linear_under_autocast_gives_fp32_weight_gradients(grouped_mm_dtypes):
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    counts = torch.tensor([5, 0, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, counts)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
    assert set(grouped_mm_dtypes) == {torch.bfloat16}


def test_expert_ffn_without_autocast_still_refuses_mixed_dtypes():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="w_in_EDH"):
        expert_ffn(x, torch.tensor([4]), torch.randn(1, 16, 16), torch.randn(1, 16, 16))


@pytest.fixture(params=["bmm", "sum", "index_add"])
def combine_mode(request, monkeypatch):
    from moekit.dispatch import dispatcher

    monkeypatch.setattr(dispatcher, "COMBINE", request.param)
    return request.param


def test_combine_strategies_agree_with_the_reference_in_float64(combine_mode):
    """Every combine strategy gives the looped reference's outputs and gradients."""
    from tests.builders import assert_layer_matches_reference

    for dispatch in (
        moekit.DispatchConfig(),
        moekit.DispatchConfig(mode="capacity", capacity_factor=0.75),
    ):
        layer = _layer(dispatch=dispatch).double()
        x = torch.randn(3, 7, 32, dtype=torch.float64)
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[0, :2] = False
        assert_layer_matches_reference(layer, x, padding_mask=mask)


def test_combine_accumulates_in_fp32(combine_mode):
    """Many small bf16 rows into one token: an fp32 accumulator keeps what bf16 would round."""
    T, K, D = 1, 64, 8
    expert_idx = torch.arange(K).view(T, K)
    weights = torch.ones(T, K)
    plan = plan_dispatch(expert_idx, weights, K)
    y_MD = torch.full((K, D), 2**-9, dtype=torch.bfloat16)
    y_MD[0] = 1.0  # one large row, then 63 below half of bf16's spacing at 1.0
    x_TD = torch.zeros(T, D, dtype=torch.bfloat16)
    out = combine(x_TD, y_MD, plan)
    assert out.dtype == torch.bfloat16
    exact = torch.full((T, D), 1.0 + 63 * 2**-9).to(torch.bfloat16)
    assert torch.equal(out, exact)

    # bf16 expert rows into an fp32 residual: the sum accumulates in fp32 and is rounded at
    # most once, to bf16
    y_MD = torch.randn(K, D).to(torch.bfloat16)
    weights = torch.full((T, K), 1.0 / 3.0)
    plan = plan_dispatch(expert_idx, weights, K)
    out = combine(torch.zeros(T, D), y_MD, plan)
    exact = (y_MD.double() / 3.0).sum(0, keepdim=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=0)


def test_gather_backward_sums_in_slot_order_in_fp32():
    """The dispatch gather's gradient: each token's K row gradients summed once in fp32."""
    from moekit.dispatch.dispatcher import gather_rows

    T, K, D = 3, 64, 4
    expert_idx = torch.stack([torch.randperm(K) for _ in range(T)])
    plan = plan_dispatch(expert_idx, torch.ones(T, K), K)
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    rows = gather_rows(x, plan, slot_sum=True)
    assert torch.equal(rows, x.detach()[plan.token_idx_M])
    grad_rows = torch.rand(T * K, D).to(torch.bfloat16)
    rows.backward(grad_rows)
    exact = torch.zeros(T, D, dtype=torch.float64).index_add_(
        0, plan.token_idx_M, grad_rows.double()
    )
    assert torch.equal(x.grad, exact.to(torch.bfloat16))


def test_bias_gradient_sums_accumulate_in_fp32():
    rows = torch.full((4096, 2), 1.0, dtype=torch.bfloat16)
    counts = torch.tensor([4096])
    total = _sum_rows_per_expert(rows, counts)
    assert total.dtype == torch.bfloat16 and torch.equal(
        total, torch.full((1, 2), 4096.0).bfloat16()
    )
    rows = torch.rand(3000, 3).to(torch.bfloat16)
    total = _sum_rows_per_expert(rows, torch.tensor([1000, 0, 2000]))
    exact = torch.stack([rows[:1000].double().sum(0), torch.zeros(3), rows[1000:].double().sum(0)])
    assert torch.equal(total, exact.to(torch.bfloat16))  # one rounding, at the end


def test_layer_gradients_with_slot_order_gather_match_the_reference(monkeypatch):
    """The accelerator's gather (forced on the CPU) gives the same layer gradients, float64
    gradcheck included."""
    from moekit.dispatch import dispatcher

    real = dispatcher.gather_rows
    monkeypatch.setattr(dispatcher, "gather_rows", lambda x, plan: real(x, plan, slot_sum=True))
    layer = _layer(dispatch=moekit.DispatchConfig(mode="capacity", capacity_factor=0.75))
    layer = layer.double()
    x = torch.randn(12, 32, dtype=torch.float64, requires_grad=True)
    routes = layer(x).routing.expert_idx_TK
    layer.router.forced_routes = lambda n: routes
    assert torch.autograd.gradcheck(lambda t: layer(t).output, (x,))
