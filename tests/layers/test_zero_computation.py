"""Zero-computation experts (MoE++ zero/copy/constant, LongCat-Flash identity), sqrt-softplus
scores (DeepSeek-V4) and token-table routing (DeepSeek-V4's hash layers), each against a loop
over tokens on outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moekit.experts.bank import ExpertConfig
from moekit.experts.zero_computation import ZeroComputationConfig
from moekit.layers import MoEConfig
from moekit.routing import Gating, TokenTableRouterConfig, TopKRouterConfig


def _layer(**kw):
    torch.manual_seed(0)
    layer = MoEConfig(
        num_experts=4,
        top_k=3,
        experts=ExpertConfig(hidden=6),
        zero_computation=ZeroComputationConfig(zero=1, copy=2, constant=2),
        **kw,
    ).build(d_model=8)
    with torch.no_grad():  # a non-trivial constant gate
        layer.zero_computation.gate_C2D.normal_()
    return layer.double()


def reference(layer, x_TD, token_ids=None):
    """A loop over tokens and their slots."""
    routing = layer.router(x_TD, token_ids)
    zc, bank = layer.zero_computation, layer.experts
    E, cfg = layer.num_experts, zc.config
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for e, w in zip(routing.expert_idx_TK[t].tolist(), routing.weights_TK[t], strict=True):
            x = x_TD[t]
            if e < E:
                y = y + w * bank.forward_one(e, x.unsqueeze(0))[0]
            elif e - E < cfg.zero:
                pass
            elif e - E < cfg.zero + cfg.copy:
                y = y + w * x
            else:
                c = e - E - cfg.zero - cfg.copy
                a = torch.softmax(zc.gate_C2D[c] @ x, dim=-1)
                y = y + w * (a[0] * x + a[1] * zc.vectors_CD[c])
        rows.append(y)
    return torch.stack(rows)


def test_zero_copy_constant_experts_match_a_loop_with_gradients():
    layer = _layer()
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    chosen = out.routing.expert_idx_TK
    assert (chosen >= 4).any() and (chosen < 4).any()  # both kinds are exercised
    expected = reference(layer, x)
    assert torch.allclose(out.output, expected, atol=1e-10)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad((out.output * g).sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad(
        (expected * g).sum(), [x, *layer.parameters()], allow_unused=True
    )
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, torch.zeros_like(a) if b is None else b, atol=1e-10)
    # a token routed only to special experts computes no FFN
    assert out.stats is not None and out.stats.tokens_per_expert.sum() < 40 * 3


def test_padding_gets_no_zero_computation_output():
    layer = _layer()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = layer(x, mask)
    assert torch.equal(out.output[1, 2:], torch.zeros_like(out.output[1, 2:]))


def test_sqrt_softplus_scores_match_a_loop():
    layer = _layer(
        router=TopKRouterConfig(
            gating=Gating.SQRT_SOFTPLUS_TOPK, routed_scaling_factor=1.5, bias_balancing=True
        )
    )
    with torch.no_grad():
        layer.router.expert_bias_E.normal_()
    x = torch.randn(30, 8, dtype=torch.float64)
    routing = layer.router(x)
    logits = x @ layer.router.weight_ED.t()
    for t in range(30):
        scores = [F.softplus(v).sqrt().detach() for v in logits[t]]
        biased = [s + b for s, b in zip(scores, layer.router.expert_bias_E.detach(), strict=True)]
        top = sorted(range(len(scores)), key=lambda e: -float(biased[e]))[:3]
        assert sorted(routing.expert_idx_TK[t].tolist()) == sorted(top)
        total = sum(scores[e] for e in top)
        for j, e in enumerate(routing.expert_idx_TK[t].tolist()):
            assert torch.isclose(routing.weights_TK[t, j], 1.5 * scores[e] / total)


def test_token_table_routing_uses_the_table_and_learned_weights():
    torch.manual_seed(0)
    config = TokenTableRouterConfig(vocab_size=11, gating=Gating.SQRT_SOFTPLUS_TOPK)
    router = config.build(d_model=8, num_experts=6, top_k=2).double()
    with torch.no_grad():
        router.table_VK.copy_(torch.randint(0, 6, (11, 2)))
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (9,))
    out = router(x, ids)
    assert torch.equal(out.expert_idx_TK, router.table_VK[ids])
    scores = F.softplus(x @ router.weight_ED.t()).sqrt()
    picked = scores.gather(1, router.table_VK[ids])
    assert torch.allclose(out.weights_TK, picked / picked.sum(-1, keepdim=True))
    out.weights_TK[:, 0].sum().backward()
    assert router.weight_ED.grad is not None and x.grad is not None
    assert "table_VK" in router.state_dict()  # saved and loaded with the weights


def test_zero_computation_in_a_language_model_and_its_accounting():
    from moekit.analysis.params import count_parameters
    from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM
    from moekit.models.common.attention import AttentionConfig

    config = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=24,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=4,
                top_k=2,
                experts=ExpertConfig(hidden=8),
                zero_computation=ZeroComputationConfig(zero=1, copy=1, constant=1),
            )
        ),
    )
    model = TransformerLM(config)
    out = model(torch.randint(0, 32, (2, 7)))
    out.logits.sum().backward()
    assert count_parameters(config).total == sum(p.numel() for p in model.parameters())


def test_hash_layers_route_the_first_blocks_by_the_token_table():
    from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM
    from moekit.models.common.attention import AttentionConfig
    from moekit.routing.hashing import TokenTableRouter
    from moekit.routing.topk import TopKRouter
    from moekit.utils.serialization import config_from_dict, config_to_dict

    config = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=3,
        attention=AttentionConfig(n_heads=2),
        ffn_hidden=24,
        moe=MoEPlacementConfig(
            layer=MoEConfig(
                num_experts=4,
                top_k=2,
                experts=ExpertConfig(hidden=8),
                router=TopKRouterConfig(gating=Gating.SQRT_SOFTPLUS_TOPK),
            ),
            hash_layers=2,
            hash_router=TokenTableRouterConfig(vocab_size=32),
        ),
    )
    assert config_from_dict(TransformerConfig, config_to_dict(config)) == config
    model = TransformerLM(config)
    kinds = [type(block.ffn.router) for block in model.blocks]
    assert kinds == [TokenTableRouter, TokenTableRouter, TopKRouter]
    tokens = torch.randint(0, 32, (2, 5))
    out = model(tokens)
    table = model.blocks[0].ffn.router.table_VK
    assert torch.equal(out.moe_outputs[0].routing.expert_idx_TK, table[tokens.reshape(-1)])
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerConfig(
            **{
                **config.__dict__,
                "moe": MoEPlacementConfig(
                    layer=config.moe.layer,
                    hash_layers=1,
                    hash_router=TokenTableRouterConfig(vocab_size=31),
                ),
            }
        )


def test_router_weight_on_the_expert_input_matches_a_loop():
    from moekit.dispatch.dispatcher import DispatchConfig

    torch.manual_seed(0)
    layer = (
        MoEConfig(
            num_experts=4,
            top_k=2,
            experts=ExpertConfig(hidden=6),
            router=TopKRouterConfig(gating=Gating.SIGMOID_TOPK, normalize_weights=False),
            dispatch=DispatchConfig(weight_input=True),
        )
        .build(d_model=8)
        .double()
    )
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    routing = out.routing
    expected = torch.stack(
        [
            sum(
                layer.experts.forward_one(int(e), (w * x[t]).unsqueeze(0))[0]
                for e, w in zip(routing.expert_idx_TK[t], routing.weights_TK[t], strict=True)
            )
            for t in range(20)
        ]
    )
    assert torch.allclose(out.output, expected, atol=1e-10)
    g = torch.randn_like(expected)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((out.output * g).sum(), params, retain_graph=True)
    grads_ref = torch.autograd.grad((expected * g).sum(), params)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
