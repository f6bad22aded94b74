"""Null (zero) experts with an elastic number of real experts per token: the selection offset
moves only the choice, the controller steers training to a target, and
``set_compute_budget`` sets any budget in [0, k] after training."""

import pytest
import torch

import moekit
from moekit.experts.bank import ExpertConfig
from moekit.experts.zero_computation import ZeroComputationConfig
from moekit.layers import MoEConfig
from tests.builders import tiny_lm


def _layer(**zero):
    torch.manual_seed(0)
    return MoEConfig(
        num_experts=4,
        top_k=2,
        experts=ExpertConfig(hidden=6),
        zero_computation=ZeroComputationConfig(zero=4, **zero),
    ).build(d_model=8)


def _real_per_token(layer, x):
    chosen = layer.router(x).expert_idx_TK
    return float((chosen < layer.num_experts).sum()) / x.shape[0]


def test_the_offset_moves_the_choice_not_the_weights():
    layer = _layer().eval()
    x = torch.randn(64, 8)
    base = layer.router(x)
    slots = layer.router.null_slots
    assert slots is not None and float(slots.offset) == 0.0
    slots.offset.fill_(0.05)
    shifted = layer.router(x)
    assert _real_per_token(layer, x) < float((base.expert_idx_TK < 4).sum()) / 64
    # each kept slot's weight is still the live score of that expert, renormalised over the k
    probs = torch.softmax(x @ layer.router.weight_ED.t(), dim=-1)
    expected = probs.gather(1, shifted.expert_idx_TK)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(shifted.weights_TK, expected)
    slots.offset.fill_(-10.0)
    assert _real_per_token(layer, x) == 2.0  # every slot on a real expert
    slots.offset.fill_(10.0)
    assert _real_per_token(layer, x) == 0.0  # every slot on a zero expert: no compute


def test_the_controller_steers_training_to_the_target():
    layer = _layer(target_experts_per_token=1.6, offset_rate=0.02).train()
    x = torch.randn(256, 8)
    start = _real_per_token(layer.eval(), x)
    layer.train()
    for _ in range(60):
        layer(x)
        assert moekit.update_null_offsets(layer) == 1
    end = _real_per_token(layer.eval(), x)
    assert abs(start - 1.6) > 0.3  # it had somewhere to go
    assert abs(end - 1.6) < 0.15, (start, end)
    assert float(layer.router.null_slots.tally.sum()) == 0.0  # cleared by each update


def test_set_compute_budget_hits_each_budget_in_every_layer():
    zero = ZeroComputationConfig(zero=4)
    model = tiny_lm(num_experts=4, top_k=2, zero_computation=zero).eval()
    tokens = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(0))
    for budget in (2.0, 1.5, 1.0, 0.5, 0.0):
        achieved = moekit.set_compute_budget(model, budget, tokens)
        assert len(achieved) == 2
        assert all(abs(a - budget) <= 2 / 128 for a in achieved), (budget, achieved)
    with pytest.raises(ValueError, match=r"experts_per_token must be in \[0, top_k=2\]"):
        moekit.set_compute_budget(model, 2.5, tokens)
    with pytest.raises(ValueError, match="no zero experts"):
        moekit.set_compute_budget(tiny_lm(), 1.0, tokens)


def test_checkpoints_from_before_the_offset_load_with_it_at_zero():
    layer = _layer()
    state = layer.state_dict()
    state.pop("router.null_slots.offset")
    state.pop("router.null_slots.tally")
    fresh = _layer()
    fresh.router.null_slots.offset.fill_(3.0)
    fresh.load_state_dict(state)  # strict
    assert float(fresh.router.null_slots.offset) == 0.0


def test_a_target_needs_zero_experts_a_top_k_router_and_at_most_k():
    with pytest.raises(ValueError, match="needs zero >= 1"):
        ZeroComputationConfig(copy=1, target_experts_per_token=1.0)
    with pytest.raises(ValueError, match="must be <= top_k=2"):
        _layer(target_experts_per_token=3.0)
    with pytest.raises(ValueError, match="needs router kind 'top_k'"):
        MoEConfig(
            num_experts=4,
            top_k=2,
            experts=ExpertConfig(hidden=6),
            router=moekit.SparseMixerRouterConfig(),
            zero_computation=ZeroComputationConfig(zero=2, target_experts_per_token=1.0),
        )
