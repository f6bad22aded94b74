import math

import pytest
import torch

import moekit
from moekit.losses import (
    cv_squared,
    importance_loss,
    load_loss,
    router_z_loss,
    switch_load_balancing_loss,
)
from tests.builders import make_moe


def _switch_by_hand(probs, idx, mask):
    T, E = probs.shape
    K = idx.shape[1]
    rows = [t for t in range(T) if mask[t]]
    f = [
        sum(int(idx[t, j]) == i for t in rows for j in range(K)) / (K * len(rows)) for i in range(E)
    ]
    P = [sum(float(probs[t, i]) for t in rows) / len(rows) for i in range(E)]
    return E * sum(fi * pi for fi, pi in zip(f, P, strict=True))


def test_uniform_router_gives_switch_loss_exactly_one():
    for E, K in [(4, 1), (8, 2), (64, 6)]:
        probs = torch.full((37, E), 1.0 / E)
        idx = torch.randint(0, E, (37, K))
        assert switch_load_balancing_loss(probs, idx).item() == pytest.approx(1.0, abs=1e-6)
    moe = make_moe(num_experts=8)
    torch.nn.init.zeros_(moe.router.weight_ED)
    out = moe(torch.randn(5, 9, 8))
    assert out.losses["switch"].item() == pytest.approx(1.0, abs=1e-6)


def test_switch_loss_matches_hand_count_with_mask_and_per_sequence():
    B, S, E, K = 3, 5, 4, 2
    probs = torch.softmax(torch.randn(B * S, E), -1)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    mask = torch.rand(B * S) > 0.3
    mask[0] = True
    got = switch_load_balancing_loss(probs, idx, token_mask_T=mask)
    assert got.item() == pytest.approx(_switch_by_hand(probs, idx, mask.tolist()), rel=1e-5)
    got_seq = switch_load_balancing_loss(probs, idx, token_mask_T=mask, sequence_length=S)
    per_seq = [
        _switch_by_hand(
            probs[b * S : (b + 1) * S], idx[b * S : (b + 1) * S], mask[b * S : (b + 1) * S].tolist()
        )
        for b in range(B)
        if mask[b * S : (b + 1) * S].any()
    ]
    assert got_seq.item() == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-5)
    with pytest.raises(ValueError, match="sequence_length"):
        switch_load_balancing_loss(probs, idx, sequence_length=4)


def test_switch_loss_is_minimal_when_balanced_and_grows_with_collapse():
    E = 4
    balanced = switch_load_balancing_loss(
        torch.full((8, E), 0.25), torch.arange(8).remainder(E).unsqueeze(1)
    )
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    collapsed = switch_load_balancing_loss(collapsed_probs, torch.zeros(8, 1, dtype=torch.long))
    assert balanced.item() == pytest.approx(1.0)
    assert collapsed.item() == pytest.approx(4 * 0.97)


def test_importance_loss_is_cv_squared_of_gate_sums():
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    idx = torch.tensor([[0, 1], [0, 2], [3, 0]])
    importance = torch.tensor([0.7 + 0.6 + 0.1, 0.3, 0.4, 0.9])
    expected = importance.var(unbiased=False) / importance.mean() ** 2
    torch.testing.assert_close(importance_loss(weights, idx, 4), expected)
    assert cv_squared(torch.ones(5)).item() == 0.0


def test_load_loss_matches_per_element_formula():
    T, E, K = 6, 5, 2
    clean = torch.randn(T, E, requires_grad=True)
    std = torch.rand(T, E) + 0.5
    noisy = clean.detach() + torch.randn(T, E) * std
    loss = load_loss(clean, noisy, std, K)
    load = [0.0] * E
    for t in range(T):
        for i in range(E):
            others = sorted((float(noisy[t, j]) for j in range(E) if j != i), reverse=True)
            threshold = others[K - 1]
            z = (float(clean.detach()[t, i]) - threshold) / float(std[t, i])
            load[i] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    load = torch.tensor(load)
    expected = load.var(unbiased=False) / load.mean() ** 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert clean.grad.abs().sum() > 0  # differentiable, unlike hard counts


def test_z_loss_by_hand_with_mask():
    logits = torch.randn(4, 3)
    mask = torch.tensor([True, False, True, True])
    z = torch.log(torch.exp(logits).sum(-1)) ** 2
    torch.testing.assert_close(router_z_loss(logits, token_mask_T=mask), z[mask].mean())


def test_layer_reports_weighted_aux_loss():
    moe = make_moe(
        router=moekit.RouterConfig(noisy_gating=True),
        aux_loss=moekit.AuxLossConfig(switch=0.5, z_loss=0.25, importance=0.125, load=2.0),
    ).train()
    out = moe(torch.randn(3, 5, 8))
    assert set(out.losses) == {"switch", "z_loss", "importance", "load"}
    expected = (
        0.5 * out.losses["switch"]
        + 0.25 * out.losses["z_loss"]
        + 0.125 * out.losses["importance"]
        + 2.0 * out.losses["load"]
    )
    torch.testing.assert_close(out.aux_loss, expected)


def test_deepseek_bias_balancing_moves_load_toward_balance():
    torch.manual_seed(0)
    moe = make_moe(
        num_experts=8,
        top_k=2,
        router=moekit.RouterConfig(bias_balancing=True, bias_update_rate=0.003),
    ).train()
    with torch.no_grad():  # skew the router toward experts 0 and 1 for these inputs
        moe.router.weight_ED[:2] += 0.3
    x = torch.randn(512, 8) + 1.0
    with torch.no_grad():
        load_before = moe(x).stats.tokens_per_expert.float()
    moe.router.load_since_update_E.zero_()
    load_after = torch.zeros(8)
    for step in range(300):
        with torch.no_grad():
            out = moe(x)
        if step >= 250:  # the sign rule oscillates around balance: average the last steps
            load_after += out.stats.tokens_per_expert
        moekit.update_expert_bias(moe)
    imbalance_before = (load_before.max() / load_before.mean()).item()
    imbalance_after = (load_after.max() / load_after.mean()).item()
    assert imbalance_before > 3.0
    assert imbalance_after < 1.2
    # the bias only affects selection: weights are the unbiased probabilities at the chosen experts
    out = moe(x)
    probs = torch.softmax(x @ moe.router.weight_ED.t(), -1).gather(1, out.routing.expert_idx_TK)
    torch.testing.assert_close(out.routing.weights_TK, probs / probs.sum(-1, keepdim=True))


def test_bias_update_ignores_eval_calls_and_is_noop_without_balancing():
    moe = make_moe(router=moekit.RouterConfig(bias_balancing=True)).eval()
    moe(torch.randn(10, 8))
    assert moe.router.load_since_update_E.sum() == 0
    assert moekit.update_expert_bias(make_moe()) == 0
