"""Each router family: its defining property, and the layer against the looped reference."""

import itertools
import math

import pytest
import torch

import moekit
from moekit.dispatch.reference import reference_moe_output
from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.routing.base_layers import (
    exact_balanced_assignment,
    sinkhorn_balanced_assignment,
)
from tests.builders import KINDS, assert_grads_close, loss_and_grads, make_moe, placement

D, E = 8, 4


def _moe(name, **kw):
    options, top_k = KINDS[name]
    return make_moe(
        d_model=D, num_experts=E, top_k=top_k, router=moekit.RouterConfig(**options), **kw
    )


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_router_matches_the_looped_reference(name):
    moe = _moe(name, aux_loss=moekit.AuxLossConfig(switch=0.01, z_loss=0.01, importance=0.01))
    x = torch.randn(2, 12, D)
    token_ids = torch.randint(0, 50, (2, 12))

    def fast(x_):
        torch.manual_seed(5)  # the same random draws (GShard's second expert) on both paths
        return moe(x_, token_ids=token_ids).output

    def reference(x_):
        torch.manual_seed(5)
        routing = moe.router(x_.reshape(-1, D), token_ids.reshape(-1))
        return reference_moe_output(moe, x_, routing)

    out_fast, g_fast = loss_and_grads(moe, x, fast)
    out_ref, g_ref = loss_and_grads(moe, x, reference)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_fast, g_ref)
    assert torch.isfinite(moe(x, token_ids=token_ids).aux_loss)


def test_dense_gate_equals_weighted_sum_of_every_expert():
    for name in ("dense", "dense_eigen2013"):
        moe = _moe(name)
        x = torch.randn(7, D)
        out = moe(x)
        alpha = out.routing.weights_TK
        expected = sum(alpha[:, e : e + 1] * moe.experts.forward_one(e, x) for e in range(E))
        torch.testing.assert_close(out.output, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alpha.sum(-1), torch.ones(7))
        assert float(out.stats.experts_per_token) == E


def test_gshard_second_expert_kept_with_probability_two_g2():
    torch.manual_seed(0)
    moe = _moe("gshard_top2").train()
    x = torch.randn(32, D) * 3
    draws = 400
    kept = torch.zeros(32)
    for _ in range(draws):
        kept += moe.router(x).assignment_mask_TK[:, 1].float()
    g2 = moe.router(x).weights_TK[:, 1].detach()
    expected = (2 * g2).clamp(max=1)
    sigma = (expected * (1 - expected) / draws).sqrt().clamp(min=1e-3)
    z = (kept / draws - expected).abs() / sigma
    assert z.max() < 4.5  # every token's keep rate within 4.5 sigma of min(1, 2 g2)
    assert (kept / draws).min() < 0.9  # and weak second choices are really skipped
    assert moe.eval().router(x).assignment_mask_TK is None  # eval keeps both


def test_expert_choice_gives_each_expert_exactly_c_tokens():
    moe = _moe("expert_choice")
    x = torch.randn(3, 10, D)
    out = moe(x)
    c = math.ceil(1.5 * 30 / E)
    assert out.stats.tokens_per_expert.tolist() == [c] * E
    chosen_by = out.routing.assignment_mask_TK.sum(-1)
    assert float(out.stats.unrouted_fraction) == pytest.approx(
        float((chosen_by == 0).float().mean())
    )
    assert torch.equal(
        out.output.reshape(-1, D)[chosen_by == 0], torch.zeros(int((chosen_by == 0).sum()), D)
    )


def test_base_layers_balance_exactly_in_training_and_are_greedy_at_inference():
    for T, exact_max in ((24, 512), (37, 512), (200, 16)):  # exact, uneven, Sinkhorn path
        moe = _moe("base")
        moe.router.config.exact_assignment_max_tokens = exact_max
        counts = moe.train()(torch.randn(T, D)).stats.tokens_per_expert
        assert counts.max() - counts.min() <= 1 and int(counts.sum()) == T
    x = torch.randn(20, D)
    out = moe.eval()(x)
    assert torch.equal(out.routing.expert_idx_TK[:, 0], out.routing.logits_TE.argmax(-1))


def test_exact_balanced_assignment_is_optimal_on_a_tiny_problem():
    scores = torch.randn(6, 3)
    best = max(
        itertools.permutations([0, 0, 1, 1, 2, 2]),
        key=lambda p: sum(float(scores[t, e]) for t, e in enumerate(p)),
    )
    got = exact_balanced_assignment(scores)
    assert sum(float(scores[t, e]) for t, e in enumerate(got.tolist())) == pytest.approx(
        sum(float(scores[t, e]) for t, e in enumerate(best))
    )
    approx = sinkhorn_balanced_assignment(scores, 50)
    assert torch.bincount(approx, minlength=3).tolist() == [2, 2, 2]


@pytest.mark.parametrize("name", ["hash", "random_static"])
def test_hash_routing_is_a_pure_function_of_the_token_id(name):
    moe = _moe(name)
    ids = torch.tensor([3, 17, 3, 42, 17, 3])
    a = moe(torch.randn(6, D), token_ids=ids).routing.expert_idx_TK[:, 0]
    b = moe(torch.randn(6, D) * 10, token_ids=ids).routing.expert_idx_TK[:, 0]
    assert torch.equal(a, b)
    assert a[0] == a[2] == a[5] and a[1] == a[4]
    assert sum(p.numel() for p in moe.router.parameters()) == 0
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(6, D))


def test_soft_moe_weights_sum_to_one_and_every_token_gets_output():
    moe = make_moe(
        d_model=D,
        num_experts=E,
        top_k=1,
        router=moekit.RouterConfig(kind="soft", slots_per_expert=2),
    )
    x = torch.randn(3, 9, D)
    out = moe(x)
    r = out.routing
    torch.testing.assert_close(r.dispatch_BSN.sum(dim=1), torch.ones(3, E * 2))
    torch.testing.assert_close(r.combine_BSN.sum(dim=2), torch.ones(3, 9))
    assert (out.output.abs().sum(-1) > 0).all()
    assert float(out.stats.dropped_fraction) == 0.0


def test_soft_moe_matches_looped_reference():
    moe = make_moe(
        d_model=D,
        num_experts=E,
        top_k=1,
        router=moekit.RouterConfig(kind="soft", slots_per_expert=2),
    )
    x = torch.randn(2, 5, D)

    def reference(x_):
        r = moe.router(x_)
        outs = []
        for b in range(x_.shape[0]):
            slot_out = []
            for n in range(E * 2):
                slot_in = sum(r.dispatch_BSN[b, s, n] * x_[b, s] for s in range(x_.shape[1]))
                slot_out.append(moe.experts.forward_one(n // 2, slot_in.unsqueeze(0))[0])
            outs.append(
                torch.stack(
                    [
                        sum(r.combine_BSN[b, s, n] * slot_out[n] for n in range(E * 2))
                        for s in range(x_.shape[1])
                    ]
                )
            )
        return torch.stack(outs)

    out_fast, g_fast = loss_and_grads(moe, x, lambda x_: moe(x_).output)
    out_ref, g_ref = loss_and_grads(moe, x, reference)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_fast, g_ref)


def test_top_p_uses_more_experts_as_p_grows():
    moe = _moe("top_p")
    x = torch.randn(64, D)
    averages = []
    for p in (0.2, 0.5, 0.8, 0.99):
        moe.router.config.top_p = p
        out = moe(x)
        averages.append(float(out.stats.experts_per_token))
        assert out.routing.assignment_mask_TK[:, 0].all()  # at least one expert
        assert out.routing.assignment_mask_TK.sum(-1).max() <= 3  # capped at k_max
    assert averages == sorted(averages) and averages[-1] > averages[0]


def test_hierarchical_moe_collects_inner_losses_and_stats():
    inner = [
        make_moe(d_model=D, num_experts=3, top_k=1, aux_loss=moekit.AuxLossConfig(switch=0.5))
        for _ in range(2)
    ]
    outer = moekit.MoE(
        d_model=D,
        router=moekit.RouterConfig().build(d_model=D, num_experts=2, top_k=1),
        experts=moekit.ModuleExperts(inner),
        aux_loss=moekit.AuxLossConfig(switch=0.1),
    )
    x = torch.randn(16, D)
    out = outer(x)
    assert len(out.inner_outputs) == len({int(e) for e in out.routing.expert_idx_TK[:, 0]})
    own = 0.1 * out.losses["switch"]
    torch.testing.assert_close(out.aux_loss, own + sum(o.aux_loss for o in out.inner_outputs))
    with moekit.collect_moe_outputs(outer) as collected:
        again = outer(x)
    torch.testing.assert_close(collected.aux_loss(), again.aux_loss)  # no double counting
    assert len(collected.stats()) == 1 + len(again.inner_outputs)


@pytest.mark.parametrize("kind", ["expert_choice", "soft", "base"])
def test_causal_lm_refuses_non_causal_routers(kind):
    with pytest.raises(ValueError, match="not causal"):
        TransformerConfig(
            vocab_size=20,
            d_model=16,
            n_layers=1,
            attention=AttentionConfig(n_heads=2),
            ffn_hidden=16,
            moe=placement(
                16, num_experts=4, top_k=1, expert_hidden=8, router=moekit.RouterConfig(kind=kind)
            ),
        )


@pytest.mark.parametrize(
    ("kind", "top_k", "extra"),
    [
        ("hash", 1, {}),
        ("random_static", 1, {"vocab_size": 37}),
        ("top_p", 2, {}),
        ("gshard_top2", 2, {}),
        ("dense", 1, {}),
        ("top_k", 1, {}),
    ],
)
def test_causal_routers_train_in_the_lm_and_stay_causal(kind, top_k, extra):
    cfg = TransformerConfig(
        vocab_size=37,
        d_model=16,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=16,
        moe=placement(
            16,
            num_experts=4,
            top_k=top_k,
            expert_hidden=8,
            router=moekit.RouterConfig(kind=kind, **extra),
        ),
    )
    model = TransformerLM(cfg).eval()
    tokens = torch.randint(0, 37, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 3) % 37
    with torch.no_grad():
        torch.testing.assert_close(
            model(changed).logits[:, :6], model(tokens).logits[:, :6], rtol=0, atol=1e-5
        )
    model.train()
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten())
    (loss + out.aux_loss).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "embed" in n)
