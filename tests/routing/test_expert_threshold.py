"""Expert-Threshold routing (causal expert choice): the thresholds reproduce expert choice on the
batch they came from, a token's route never depends on later tokens, warm-up is token choice,
the moving average, padding, and a decoder that trains with it and decodes with the same rule."""

import math

import pytest
import torch

import moekit
from moekit.routing import ExpertChoiceRouterConfig
from moekit.routing.expert_threshold import ExpertThresholdRouterConfig
from tests.builders import tiny_lm


def _router(E=6, c=2.0, **options):
    torch.manual_seed(0)
    config = ExpertThresholdRouterConfig(capacity_factor=c, **options)
    return config.build(d_model=8, num_experts=E, top_k=2)


def test_warm_up_is_token_choice_top_k():
    router = _router(c=2.0).eval()
    x = torch.randn(10, 8)
    result = router(x)
    chosen = result.assignment_mask_TK
    assert chosen.sum(dim=1).tolist() == [2] * 10
    top2 = result.probs_TE.topk(2, dim=-1).indices
    assert chosen.gather(1, top2).all()


def test_thresholds_from_a_batch_reproduce_expert_choice_on_it():
    router = _router(E=6, c=2.0)
    x = torch.randn(24, 8)
    router.train()(x)  # tallies this batch's cut
    router.update_thresholds()
    ec = ExpertChoiceRouterConfig(capacity_factor=2.0).build(d_model=8, num_experts=6, top_k=2)
    ec.weight_ED.data.copy_(router.weight_ED.data)
    with torch.no_grad():
        ours = router.eval()(x).assignment_mask_TK
        theirs = ec(x).assignment_mask_TK
    assert torch.equal(ours, theirs)
    assert ours.sum(dim=0).tolist() == [math.ceil(2.0 * 24 / 6)] * 6  # balanced by construction


def test_a_route_never_depends_on_later_tokens():
    router = _router(E=6, c=2.0)
    router.train()(torch.randn(32, 8))
    router.update_thresholds()
    x = torch.randn(16, 8)
    later = x.clone()
    later[10:] = torch.randn(6, 8) * 5  # perturb the later tokens only
    for mode in (router.eval(), router.train()):
        with torch.no_grad():
            a = mode(x).assignment_mask_TK
            b = mode(later).assignment_mask_TK
        assert torch.equal(a[:10], b[:10])
        assert not torch.equal(a[10:], b[10:])  # the perturbation did change something


def test_the_tally_is_averaged_and_blended_with_momentum():
    router = _router(E=4, c=1.0, threshold_momentum=0.75)
    xs = [torch.randn(12, 8) for _ in range(3)]

    def cut(x):
        scores = torch.softmax(x @ router.weight_ED.t(), dim=-1)
        return scores.sort(dim=0, descending=True).values[math.ceil(12 / 4) - 1]

    router.train()(xs[0])
    router.update_thresholds()
    torch.testing.assert_close(router.threshold_E, cut(xs[0]))
    router(xs[1])
    router(xs[2])  # two calls in one step (micro-batches, or checkpointing's recompute)
    router.update_thresholds()
    expected = 0.75 * cut(xs[0]) + 0.25 * (cut(xs[1]) + cut(xs[2])) / 2
    torch.testing.assert_close(router.threshold_E, expected)
    before = router.threshold_E.clone()
    router.update_thresholds()  # nothing tallied: unchanged
    assert torch.equal(router.threshold_E, before)


def test_padding_takes_no_expert_and_is_not_counted():
    router = _router(E=4, c=1.0)
    x = torch.randn(8, 8)
    mask = torch.tensor([True] * 6 + [False] * 2)
    padded = torch.cat([x[:6], torch.randn(2, 8) * 10])
    router.train()(padded, token_mask_T=mask)
    router.update_thresholds()
    alone = _router(E=4, c=1.0)
    alone.train()(x[:6])
    alone.update_thresholds()
    torch.testing.assert_close(router.threshold_E, alone.threshold_E)
    assert not router.eval()(padded, token_mask_T=mask).assignment_mask_TK[6:].any()


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertThresholdRouterConfig(capacity_factor=0)
    with pytest.raises(ValueError, match="threshold_momentum"):
        ExpertThresholdRouterConfig(threshold_momentum=1.0)
    with pytest.raises(ValueError, match="warmup_top_k must be <= num_experts=4"):
        ExpertThresholdRouterConfig(warmup_top_k=5).build(d_model=8, num_experts=4, top_k=2)


def test_a_decoder_trains_with_it_and_decodes_with_the_same_rule():
    model = tiny_lm(router=ExpertThresholdRouterConfig(capacity_factor=2.0))
    assert model.blocks[0].ffn.router.causal
    tokens = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, 40), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert moekit.update_expert_thresholds(model) == 2
    routers = [b.ffn.router for b in model.blocks]
    assert all(bool(r.thresholds_set) for r in routers)
    model.eval()
    with torch.no_grad():  # cached decoding routes each new token by the thresholds alone
        full = model(tokens).logits
        cache = model.new_kv_cache(4)
        pieces = [model(tokens[:, :5], kv_cache=cache).logits]
        pieces += [model(tokens[:, t : t + 1], kv_cache=cache).logits for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
