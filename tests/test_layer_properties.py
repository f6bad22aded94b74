"""Property test: random layer configurations and inputs, fast path against the looped reference
(outputs and gradients of the input and of every parameter)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekit
from moekit.dispatch.reference import reference_moe_output
from tests.builders import assert_grads_close, loss_and_grads


@st.composite
def layers_and_inputs(draw):
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    gating = draw(st.sampled_from(["softmax_topk", "topk_softmax", "sigmoid_topk"]))
    router = moekit.RouterConfig(
        gating=gating,
        normalize_weights=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        bias=draw(st.booleans()),
    )
    mode = draw(st.sampled_from(["dropless", "capacity"]))
    dispatch = (
        moekit.DispatchConfig()
        if mode == "dropless"
        else moekit.DispatchConfig(
            mode="capacity",
            capacity_factor=draw(st.sampled_from([0.3, 0.7, 1.5])),
            min_capacity=draw(st.integers(0, 2)),
            drop_priority=draw(st.sampled_from(["probability", "position", "token"])),
        )
    )
    experts = moekit.ExpertConfig(
        hidden=draw(st.integers(1, 9)),
        activation=draw(st.sampled_from(["relu", "gelu", "silu", "swiglu", "geglu"])),
        bias=draw(st.booleans()),
    )
    shared = draw(st.sampled_from([None, 5]))
    d_model = draw(st.integers(1, 8))
    config = moekit.MoEConfig(
        num_experts=E,
        top_k=K,
        experts=experts,
        router=router,
        dispatch=dispatch,
        shared_experts=None if shared is None else moekit.SharedExpertConfig(hidden=shared),
    )
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return config, d_model, (B, S), padded, seed, draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layers_and_inputs())
def test_random_layers_match_the_looped_reference(case):
    config, d_model, (B, S), padded, seed, training = case
    torch.manual_seed(seed)
    moe = config.build(d_model=d_model).train(training)
    x = torch.randn(B, S, d_model) * 2
    mask = None
    if padded:
        mask = torch.rand(B, S) > 0.3

    def fast(x_):
        return moe(x_, padding_mask=mask).output

    def reference(x_):
        routing = moe.router(x_.reshape(-1, d_model))
        return reference_moe_output(moe, x_, routing, mask)

    out_fast, g_fast = loss_and_grads(moe, x, fast)
    out_ref, g_ref = loss_and_grads(moe, x, reference)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    if mask is not None:
        assert (out_fast[~mask] == 0).all() or config.shared_experts is not None
