"""torch.compile: the MoE layer as one graph where the routing allows it, and the LM (training
step and generation) with statistics off, each equal to eager."""

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.experts.activations import Activation, activation_backward
from moekit.experts.activations import _gated_backward_functional as functional_backward
from moekit.models import TransformerConfig, TransformerLM, generate
from moekit.models.common.attention import AttentionConfig
from tests.builders import placement


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "swiglu_oai"])
def test_the_compiler_s_gated_backward_equals_the_fused_one(activation):
    h = torch.randn(7, 2 * 5) * 4
    grad = torch.randn(7, 5)
    fused = activation_backward(Activation(activation), h, grad.clone())
    torch.testing.assert_close(functional_backward(Activation(activation), h, grad), fused)


def test_layer_compiles_to_one_graph_and_equals_eager():
    """Top-k, dropless, no padding, statistics off: no graph break (fullgraph=True)."""
    torch.manual_seed(0)
    moe = moekit.MoEConfig(
        num_experts=4,
        top_k=2,
        experts=moekit.ExpertConfig(hidden=16),
        router=moekit.RouterConfig(gating="sigmoid_topk", bias_balancing=True),
        aux_loss=moekit.AuxLossConfig(switch=0.01, z_loss=0.001),
        statistics=False,
    ).build(d_model=16)
    x = torch.randn(3, 8, 16)
    eager = moe(x)
    grads = torch.autograd.grad(eager.output.sum() + eager.aux_loss, [*moe.parameters()])
    compiled = torch.compile(moe, fullgraph=True)(x)
    grads_c = torch.autograd.grad(compiled.output.sum() + compiled.aux_loss, [*moe.parameters()])
    torch.testing.assert_close(compiled.output, eager.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_lm_training_step_and_generation_compile():
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        attention=AttentionConfig(n_heads=4),
        ffn_hidden=48,
        max_seq_len=32,
        moe=placement(32, num_experts=4, top_k=2, expert_hidden=24, statistics=False),
    )
    model = TransformerLM(config)
    tokens = torch.randint(0, 64, (2, 12))

    def loss(m):
        out = m(tokens)
        return F.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.aux_loss

    eager = torch.autograd.grad(loss(model), [*model.parameters()])
    compiled_model = torch.compile(model)
    compiled = torch.autograd.grad(loss(compiled_model), [*model.parameters()])
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.eval()
    assert torch.equal(
        generate(compiled_model, tokens[0, :4], 6), generate(model, tokens[0, :4], 6)
    )
