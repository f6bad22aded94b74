import pytest
import torch

from moekit.routing import Gating, GroupScore, RouterConfig, TopKRouter
from moekit.routing.reference import reference_route

D, E, K, T = 8, 8, 2, 13

ROUTER_OPTIONS = {
    "softmax_topk_renorm": dict(gating="softmax_topk", normalize_weights=True),
    "softmax_topk_raw": dict(gating="softmax_topk", normalize_weights=False),
    "topk_softmax": dict(gating="topk_softmax"),
    "sigmoid_renorm_scaled": dict(gating="sigmoid_topk", routed_scaling_factor=2.5),
    "sigmoid_raw": dict(gating="sigmoid_topk", normalize_weights=False),
    "router_bias": dict(bias=True),
    "no_fp32": dict(float32=False),
    "jitter": dict(jitter_eps=0.1),
    "noisy": dict(noisy_gating=True, gating="topk_softmax"),
    "groups_max": dict(num_groups=4, topk_groups=2, group_score="max"),
    "groups_top2_sigmoid": dict(
        gating="sigmoid_topk", num_groups=4, topk_groups=2, group_score="top2_sum"
    ),
    "selection_bias": dict(bias_balancing=True),
}


def _router(options: dict) -> TopKRouter:
    router = RouterConfig(**options).build(d_model=D, num_experts=E, top_k=K)
    if router.noise_weight_ED is not None:
        torch.nn.init.normal_(router.noise_weight_ED, std=0.3)
    if router.expert_bias_E is not None:
        router.expert_bias_E.copy_(torch.randn(E) * 0.2)
    return router


@pytest.mark.parametrize("name", sorted(ROUTER_OPTIONS))
def test_router_matches_looped_reference_forward_and_gradients(name):
    router = _router(ROUTER_OPTIONS[name]).train()
    x = torch.randn(T, D)
    results, grads = [], []
    for route in (router, lambda x_: reference_route(router, x_)):
        router.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(123)  # same jitter and noise draws for both
        res = route(xi)
        coeff = torch.randn(res.weights_TK.shape, generator=torch.Generator().manual_seed(1))
        pcoeff = torch.randn(res.probs_TE.shape, generator=torch.Generator().manual_seed(2))
        ((res.weights_TK * coeff).sum() + (res.probs_TE * pcoeff).sum()).backward()
        results.append(res)
        grads.append(
            [xi.grad] + [p.grad.clone() for p in router.parameters() if p.grad is not None]
        )
    fast, ref = results
    assert torch.equal(fast.expert_idx_TK, ref.expert_idx_TK)
    torch.testing.assert_close(fast.weights_TK, ref.weights_TK, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.probs_TE, ref.probs_TE, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.logits_TE, ref.logits_TE, rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1])
    for g_fast, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6)


def test_noisy_gating_is_shazeer_formula():
    router = _router(dict(noisy_gating=True, gating="topk_softmax")).train()
    x = torch.randn(T, D)
    torch.manual_seed(7)
    res = router(x)
    torch.manual_seed(7)
    noise = torch.randn(T, E)
    clean = x @ router.weight_ED.t()
    std = torch.nn.functional.softplus(x @ router.noise_weight_ED.t())
    H = clean + noise * std
    top = H.topk(K, dim=-1)
    torch.testing.assert_close(res.logits_TE, H)
    assert torch.equal(res.expert_idx_TK, top.indices)
    torch.testing.assert_close(res.weights_TK, torch.softmax(top.values, dim=-1))
    # no noise in eval mode
    router.eval()
    assert torch.equal(router(x).logits_TE, clean)
    assert router(x).noise_std_TE is None


def test_selection_bias_changes_choice_but_not_weights():
    router = RouterConfig(bias_balancing=True, normalize_weights=False).build(
        d_model=D, num_experts=E, top_k=K
    )
    x = torch.randn(T, D)
    router.expert_bias_E[3] = 10.0
    res = router(x)
    assert (res.expert_idx_TK == 3).any(dim=-1).all()  # expert 3 always chosen
    probs = torch.softmax(x @ router.weight_ED.t(), dim=-1)
    torch.testing.assert_close(res.weights_TK, probs.gather(1, res.expert_idx_TK))


def test_group_limited_selection_stays_in_top_groups():
    cfg = RouterConfig(num_groups=4, topk_groups=1, group_score=GroupScore.MAX)
    router = cfg.build(d_model=D, num_experts=E, top_k=K)
    res = router(torch.randn(50, D))
    groups = res.expert_idx_TK // (E // 4)
    assert (groups == groups[:, :1]).all()
    # the kept group is the one holding the token's best expert
    assert torch.equal(groups[:, 0], res.probs_TE.argmax(-1) // (E // 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gating="softmax"), "gating must be one of"),
        (dict(group_score="mean"), "group_score must be one of"),
        (dict(jitter_eps=1.5), "jitter_eps"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(num_groups=3), "num_groups=3 must divide"),
        (dict(num_groups=2, topk_groups=3), "topk_groups"),
    ],
)
def test_bad_router_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs).build(d_model=D, num_experts=E, top_k=K)


@pytest.mark.parametrize("top_k", [0, E + 1])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k must be in"):
        TopKRouter(RouterConfig(), d_model=D, num_experts=E, top_k=top_k)


def test_gating_enum_accepts_strings():
    assert RouterConfig(gating="sigmoid_topk").gating is Gating.SIGMOID_TOPK


@pytest.mark.parametrize("swap", [False, True], ids=["as-reported", "swapped"])
def test_grouped_sigmoid_selection_in_bf16_picks_what_the_ungrouped_path_picks(swap):
    """Issue 33: with float32=False and groups, selection ranked bf16 exp(logsigmoid) scores,
    which tie for -0.5703 and -0.5625 (both -1.0156 in bf16 log space), so the tie-break, not
    the logits, chose between experts 0 and 1. Either order, the larger logit must win."""
    values = [-0.5703, -0.5625, 0.0957, 0.5508, 0.7422, -5.0]
    if swap:
        values[0], values[1] = values[1], values[0]
    larger = 0 if swap else 1
    for groups in (1, 2, 3):
        router = RouterConfig(
            gating="sigmoid_topk", num_groups=groups, topk_groups=groups, float32=False
        ).build(d_model=6, num_experts=6, top_k=4)
        with torch.no_grad():
            router.weight_ED.copy_(torch.eye(6))
        router = router.to(torch.bfloat16)
        picked = router(torch.tensor([values], dtype=torch.bfloat16)).expert_idx_TK[0].tolist()
        assert sorted(picked) == sorted([larger, 2, 3, 4]), (groups, picked)
