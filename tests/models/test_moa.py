"""Mixture of attention heads (JetMoE) against a loop over tokens and slots, outputs and
gradients in float64, with the KV cache and padding."""

import torch

from moekit.models.common.moa import MixtureOfAttentionHeads, MoAConfig
from moekit.models.common.rotary import apply_rotary, rotary_tables


def _moa():
    torch.manual_seed(0)
    layer = MixtureOfAttentionHeads(
        MoAConfig(num_experts=5, top_k=2, n_kv_heads=2, head_dim=4), d_model=12
    ).double()
    with torch.no_grad():
        layer.bias_D.normal_()
    return layer


def reference(layer, x_BSD, cos, sin):
    B, S, D = x_BSD.shape
    G, Dh = layer.n_kv_heads, layer.head_dim
    routing = layer.router(x_BSD.reshape(-1, D))
    idx = routing.expert_idx_TK.view(B, S, -1)
    w = routing.weights_TK.view(B, S, -1)
    k, v = layer.kv_proj(x_BSD).chunk(2, dim=-1)
    k = apply_rotary(k.view(B, S, G, Dh).transpose(1, 2), cos, sin)  # (B, G, S, Dh)
    v = v.view(B, S, G, Dh).transpose(1, 2)
    out = torch.zeros_like(x_BSD)
    for b in range(B):
        for t in range(S):
            y = layer.bias_D.clone()
            for j in range(idx.shape[-1]):
                e = int(idx[b, t, j])
                q = (x_BSD[b, t] @ layer.w_q_EDX[e]).view(1, G, 1, Dh)
                q = apply_rotary(q, cos[t : t + 1], sin[t : t + 1])[0, :, 0]
                heads = []
                for g in range(G):
                    scores = (k[b, g, : t + 1] @ q[g]) * Dh**-0.5
                    heads.append(torch.softmax(scores, 0) @ v[b, g, : t + 1])
                y = y + w[b, t, j] * (torch.cat(heads) @ layer.w_o_EXD[e])
            out[b, t] = y
    return out


def test_moa_matches_a_loop_with_gradients():
    layer = _moa()
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rotary_tables(4, 6, 10000.0))
    got = layer(x, rope=(cos, sin))
    expected = reference(layer, x, cos, sin)
    assert torch.allclose(got, expected, atol=1e-10)
    g = torch.randn_like(got)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((got * g).sum(), params)
    grads_ref = torch.autograd.grad((expected * g).sum(), params)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_moa_cache_and_padding():
    layer = _moa()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    cos, sin = (t.double() for t in rotary_tables(4, 8, 10000.0))
    full = layer(x, rope=(cos[:6], sin[:6]))
    keys = torch.zeros(2, 2, 8, 4, dtype=torch.float64)
    values = torch.zeros_like(keys)
    steps = [
        layer(x[:, i : i + 1], rope=(cos[i : i + 1], sin[i : i + 1]), cache=(keys, values), start=i)
        for i in range(6)
    ]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)
    # a padded key is never attended to: the real tokens' outputs stay those of the short row
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    padded = layer(x, rope=(cos[:6], sin[:6]), key_mask=mask)
    short = layer(x[1:, :4], rope=(cos[:4], sin[:4]))
    assert torch.allclose(padded[1, :4], short[0], atol=1e-10)


def test_the_attention_routers_balancing_loss_joins_the_model_loss():
    import moekit
    from moekit.experts.bank import ExpertConfig
    from moekit.layers import MoEConfig
    from moekit.losses.config import AuxLossConfig
    from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM

    def model(moa_weight: float) -> TransformerLM:
        torch.manual_seed(0)
        return TransformerLM(
            TransformerConfig(
                vocab_size=32,
                d_model=16,
                n_layers=2,
                attention=MoAConfig(
                    num_experts=4,
                    top_k=2,
                    n_kv_heads=2,
                    head_dim=4,
                    aux_loss=AuxLossConfig(switch=moa_weight),
                ),
                ffn_hidden=24,
                moe=MoEPlacementConfig(
                    layer=MoEConfig(num_experts=4, top_k=2, experts=ExpertConfig(hidden=8))
                ),
            )
        )

    tokens = torch.randint(0, 32, (2, 7))
    with_loss, without = model(0.5), model(0.0)
    extra = with_loss(tokens).aux_loss - without(tokens).aux_loss
    assert extra > 0.5 * 2 * 0.9  # two layers' Switch losses (>= 1 each), weighted 0.5
    with_loss(tokens).aux_loss.backward()
    assert with_loss.blocks[0].attn.router.weight_ED.grad.abs().sum() > 0
    with moekit.serving(with_loss), torch.no_grad():
        assert with_loss(tokens).aux_loss == 0
