"""The direct expert path of decoding-sized calls equals the sort-and-group dispatch (outputs),
with padding and zero-computation experts, and is taken only where nothing reads a plan."""

import pytest
import torch

import moekit
from moekit.dispatch import direct
from moekit.experts.zero_computation import ZeroComputationConfig


def _layer(**kw):
    torch.manual_seed(0)
    return (
        moekit.MoEConfig(num_experts=6, top_k=2, experts=moekit.ExpertConfig(hidden=12), **kw)
        .build(d_model=16)
        .eval()
    )


def _both(layer, x, mask=None):
    layer.statistics = True  # statistics read the plan: the dispatch runs
    dispatched = layer(x, mask).output
    layer.statistics = False
    calls = []
    real = direct.direct_experts

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    direct_module = moekit.layers.moe
    original = direct_module.direct_experts
    direct_module.direct_experts = counting
    try:
        fast = layer(x, mask).output
    finally:
        direct_module.direct_experts = original
    return dispatched, fast, len(calls)


def test_direct_path_equals_the_dispatch():
    layer = _layer()
    for shape in ((1, 1, 16), (2, 3, 16), (5, 16)):
        x = torch.randn(*shape)
        dispatched, fast, calls = _both(layer, x)
        assert calls == 1
        torch.testing.assert_close(fast, dispatched, rtol=1e-5, atol=1e-6)


def test_with_padding_and_zero_experts():
    layer = _layer(zero_computation=ZeroComputationConfig(zero=2, copy=1))
    x = torch.randn(2, 3, 16)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    dispatched, fast, calls = _both(layer, x, mask)
    assert calls == 1
    torch.testing.assert_close(fast, dispatched, rtol=1e-5, atol=1e-6)


def test_large_calls_and_training_keep_the_dispatch():
    layer = _layer()
    _, _, calls = _both(layer, torch.randn(20, 16))  # 40 assignments > 16
    assert calls == 0
    layer.train()
    layer.statistics = False
    assert not layer._direct(torch.randn(1, 16), layer.router(torch.randn(1, 16)))


def test_the_layer_finds_its_weights_again_after_a_move_or_an_assigning_load():
    """The layer keeps its weights' device between calls (a cheap input check); a move
    (``to``) and a ``load_state_dict(assign=True)`` make it look again."""
    x = torch.randn(2, 3, 16)
    moved, loaded = _layer(), _layer()
    for layer in (moved, loaded):
        layer(x)  # the device is looked up and kept
    moved.to("meta")
    loaded.load_state_dict(_layer().to("meta").state_dict(), assign=True)
    for layer in (moved, loaded):
        with pytest.raises(ValueError, match="x is on cpu but the layer's weights are on meta"):
            layer(x)
