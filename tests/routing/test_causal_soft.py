"""Causal Soft MoE: slots as prefix mixes of past tokens. Causal invariance (later tokens change
no earlier output), the fast form against a loop over positions and slots (outputs and every
gradient, float64 gradcheck), padding, training, and decoding without a cache."""

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.experts.bank import ExpertConfig
from moekit.layers import MoEConfig
from moekit.routing import CausalSoftRouterConfig
from tests.builders import assert_grads_close, loss_and_grads, tiny_lm


def _layer(P=2):
    torch.manual_seed(0)
    return MoEConfig(
        num_experts=3,
        top_k=1,
        experts=ExpertConfig(hidden=6),
        router=CausalSoftRouterConfig(slots_per_expert=P),
    ).build(d_model=8)


def reference(layer, x_BSD):
    """A loop over positions and slots: the slot at t is the weighted mean of x_0..x_t."""
    router, bank = layer.router, layer.experts
    phi = router.scale * F.normalize(router.phi_DN, dim=0)
    B, S, _ = x_BSD.shape
    N = phi.shape[1]
    P = router.slots_per_expert
    out = torch.zeros_like(x_BSD)
    for b in range(B):
        for t in range(S):
            logits = F.normalize(x_BSD[b, : t + 1], dim=-1) @ phi  # (t+1, N)
            combine = torch.softmax(logits[t], dim=-1)
            for n in range(N):
                w = torch.softmax(logits[:, n], dim=0)  # over positions 0..t
                slot = (w.unsqueeze(-1) * x_BSD[b, : t + 1]).sum(dim=0)
                out[b, t] = out[b, t] + combine[n] * bank.forward_one(n // P, slot[None])[0]
    return out


def test_fast_form_equals_the_loop_on_outputs_and_gradients():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    out_fast, g_fast = loss_and_grads(layer, x, lambda x_: layer(x_).output)
    out_ref, g_ref = loss_and_grads(layer, x, lambda x_: reference(layer, x_))
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(g_fast, g_ref)


def test_gradcheck_in_float64():
    layer = _layer(P=1).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: layer(x_).output, (x,))


def test_later_tokens_change_no_earlier_output():
    layer = _layer()
    x = torch.randn(2, 10, 8)
    later = x.clone()
    later[:, 6:] = torch.randn(2, 4, 8) * 10
    a, b = layer(x).output, layer(later).output
    assert torch.equal(a[:, :6], b[:, :6])  # bitwise: no term of an earlier position moves
    assert not torch.equal(a[:, 6:], b[:, 6:])
    model = tiny_lm(router=CausalSoftRouterConfig(slots_per_expert=1), top_k=1).eval()
    tokens = torch.randint(0, 40, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % 40
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits[:, :8], model(changed).logits[:, :8], rtol=0, atol=1e-6
        )


def test_padding_takes_no_part_in_any_slot():
    layer = _layer()
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[False, False, True, True, True, True]])
    padded = layer(torch.cat([torch.randn(1, 2, 8) * 9, x[:, 2:]], dim=1), padding_mask=mask)
    alone = layer(x[:, 2:])
    torch.testing.assert_close(padded.output[:, 2:], alone.output)
    assert (padded.output[:, :2] == 0).all()


def test_a_decoder_trains_with_it_and_decodes_without_a_cache():
    model = tiny_lm(router=CausalSoftRouterConfig(slots_per_expert=1), top_k=1)
    assert model.blocks[0].ffn.router.causal
    tokens = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    with pytest.raises(ValueError, match="use_cache=False"):
        moekit.models.generate(model, tokens[:1, :4], max_new_tokens=3)
    out = moekit.models.generate(model, tokens[:1, :4], max_new_tokens=3, use_cache=False)
    assert out.shape == (1, 7)
