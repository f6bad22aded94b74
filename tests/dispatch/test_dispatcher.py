"""The single-process dispatcher: padding, capacity and drops, through the layer."""

import pytest
import torch

import moekit
from tests.builders import (
    assert_grads_close,
    assert_layer_matches_reference,
    loss_and_grads,
    make_moe,
)


@pytest.mark.parametrize(
    "dispatch",
    [
        moekit.DispatchConfig(),
        moekit.DispatchConfig(mode="capacity", capacity_factor=0.6, min_capacity=1),
    ],
)
def test_padding_mask_is_not_dispatched(dispatch):
    moe = make_moe(dispatch=dispatch)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert_layer_matches_reference(moe, x, mask)
    out = moe(x, mask)
    assert torch.count_nonzero(out.output[~mask]) == 0
    assert int(out.stats.tokens_per_expert.sum()) == 10 * 2


def test_dropless_equals_capacity_with_enough_capacity():
    moe = make_moe()
    x = torch.randn(2, 10, 8)
    out_dropless, g_dropless = loss_and_grads(moe, x, lambda x_: moe(x_).output)
    moe.dispatch = moekit.DispatchConfig(mode="capacity", capacity_factor=4.0)  # C = T*K
    out_capacity, g_capacity = loss_and_grads(moe, x, lambda x_: moe(x_).output)
    stats = moe(x).stats
    assert stats.capacity == 40 and stats.dropped_fraction == 0  # capacity mode is on
    torch.testing.assert_close(out_dropless, out_capacity, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_dropless, g_capacity)


def test_dropped_tokens_get_zero_and_are_counted():
    moe = make_moe(
        num_experts=2,
        top_k=1,
        dispatch=moekit.DispatchConfig(
            mode="capacity", capacity_factor=0.25, min_capacity=1, drop_priority="position"
        ),
    ).train()
    x = torch.randn(16, 8)
    out = moe(x)
    capacity = out.stats.capacity
    assert capacity == 2  # ceil(0.25 * 16 * 1 / 2)
    assert out.stats.kept_per_expert.tolist() == out.stats.tokens_per_expert.clamp(max=2).tolist()
    kept_tokens = (out.output != 0).any(-1)
    assert int(kept_tokens.sum()) == int(out.stats.kept_per_expert.sum())
    # position priority keeps the earliest tokens of each expert
    idx = out.routing.expert_idx_TK[:, 0]
    for e in range(2):
        tokens = torch.nonzero(idx == e).flatten()
        assert kept_tokens[tokens[:capacity]].all() and not kept_tokens[tokens[capacity:]].any()
    expected = 1 - out.stats.kept_per_expert.sum() / 16
    torch.testing.assert_close(out.stats.dropped_fraction, expected.float())


def test_eval_capacity_factor_is_used_in_eval():
    moe = make_moe(
        dispatch=moekit.DispatchConfig(
            mode="capacity", capacity_factor=1.0, eval_capacity_factor=3.0, min_capacity=0
        )
    )
    x = torch.randn(20, 8)
    assert moe.train()(x).stats.capacity == 10
    assert moe.eval()(x).stats.capacity == 30


def test_the_reported_capacity_is_the_documented_formula_also_above_the_tokens():
    """Issue 33: with a factor of at least E the statistic was clamped to T·k (E=1, k=1, 8
    tokens, factor 1.25 reported 8); the formula max(min_capacity, ceil(f·T·k/E)) gives 10.
    Which tokens drop does not change (none)."""
    moe = make_moe(
        num_experts=1,
        top_k=1,
        dispatch=moekit.DispatchConfig(mode="capacity", capacity_factor=1.25, min_capacity=0),
    )
    out = moe.train()(torch.randn(8, 8))
    assert out.stats.capacity == 10
    assert float(out.stats.dropped_fraction) == 0.0
    huge = make_moe(dispatch=moekit.DispatchConfig(mode="capacity", capacity_factor=1e308))
    assert huge.train()(torch.randn(8, 8)).stats.capacity == 2**62  # dropless, no overflow
