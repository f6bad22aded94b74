"""Routing record/replay and the runtime experts-per-token knob."""

import pytest
import torch

import moekit
from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from tests.builders import placement


def _lm(seed=0, **layer) -> TransformerLM:
    torch.manual_seed(seed)
    router = layer.pop("router", moekit.RouterConfig(gating="softmax_topk", normalize_weights=True))
    config = TransformerConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        ffn_hidden=48,
        moe=placement(32, num_experts=4, top_k=2, expert_hidden=48, router=router, **layer),
    )
    return TransformerLM(config).eval()


TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_replay_reproduces_outputs_exactly_and_router_gradients_flow(tmp_path):
    model = _lm()
    with moekit.record_routing(model) as trace:
        expected = model(TOKENS).logits
    assert len(trace.names) == 2 and trace.experts_of(0).shape == (18, 2)
    path = trace.save(tmp_path / "routes.safetensors")
    loaded = moekit.RoutingTrace.load(path)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.expert_idx[1], trace.expert_idx[1], strict=True)
    )
    with moekit.replay_routing(model, loaded):
        replayed = model(TOKENS).logits
        replayed.square().mean().backward()
    assert torch.equal(replayed, expected)
    assert model.blocks[0].ffn.router.weight_ED.grad.abs().sum() > 0


def test_replay_forces_the_recorded_experts_on_another_model():
    a, b = _lm(0), _lm(1)
    with moekit.record_routing(a) as trace_a:
        a(TOKENS)
    with moekit.record_routing(b) as trace_b:
        b(TOKENS)
    assert not torch.equal(trace_a.experts_of(0), trace_b.experts_of(0))
    seen = []
    hook = b.blocks[0].ffn.router.register_forward_hook(lambda m, i, out: seen.append(out.probs_TE))
    with moekit.replay_routing(b, trace_a), moekit.record_routing(b) as forced:
        b(TOKENS)
    hook.remove()
    for layer in range(2):
        assert torch.equal(forced.experts_of(layer), trace_a.experts_of(layer))
    # the weights are b's live probabilities of a's experts, renormalised as b was trained
    chosen = seen[0].detach().gather(1, trace_a.experts_of(0))
    torch.testing.assert_close(forced.weights[0][0], chosen / chosen.sum(1, keepdim=True))


def test_a_trace_replays_on_the_hf_export_and_back(tmp_path):
    pytest.importorskip("transformers")
    from moekit.interop.hf import from_hf, to_hf

    model = _lm()
    with moekit.record_routing(model) as trace:
        model(TOKENS)
    to_hf(model, tmp_path / "hf", "mixtral")
    back = from_hf(tmp_path / "hf").eval()
    with moekit.replay_routing(back, trace), moekit.record_routing(back) as again:
        logits = back(TOKENS).logits
    for layer in range(2):
        assert torch.equal(again.experts_of(layer), trace.experts_of(layer))
    torch.testing.assert_close(logits, model(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_set_top_k_with_the_trained_k_changes_nothing_and_other_k_renormalise():
    model = _lm()
    expected = model(TOKENS).logits
    assert moekit.set_top_k(model, 2) == 2
    assert torch.equal(model(TOKENS).logits, expected)
    moekit.set_top_k(model, 1)
    with moekit.record_routing(model) as trace:
        changed = model(TOKENS).logits
    assert not torch.allclose(changed, expected)
    assert trace.experts_of(0).shape == (18, 1)
    torch.testing.assert_close(trace.weights[0][0], torch.ones(18, 1))  # renormalised top-1
    moekit.set_top_k(model, 4)
    assert model.blocks[0].ffn.top_k == 4 and model(TOKENS).logits.isfinite().all()


def test_bad_inputs_are_refused():
    model = _lm()
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        moekit.set_top_k(model, 5)
    with moekit.record_routing(model) as trace:
        model(TOKENS)
    other = TransformerLM(
        TransformerConfig(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            attention=AttentionConfig(n_heads=4),
            ffn_hidden=48,
            moe=placement(32, num_experts=8, top_k=2, expert_hidden=48),
        )
    )
    with (
        pytest.raises(ValueError, match="a trace from another model"),
        moekit.replay_routing(other, trace),
    ):
        pass
    with moekit.replay_routing(model, trace):
        model(TOKENS)
        with pytest.raises(ValueError, match="called more often than the trace recorded"):
            model(TOKENS)
    with moekit.replay_routing(model, trace), pytest.raises(ValueError, match="replayed routes"):
        model(TOKENS[:1])
    with pytest.raises(ValueError, match="not a routing trace"):
        moekit.RoutingTrace.load(__file__)
