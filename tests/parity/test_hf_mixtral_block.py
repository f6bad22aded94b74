"""moekit's layer equals Hugging Face's Mixtral sparse MoE block with the same weights."""

import pytest
import torch

import moekit

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_matches_mixtral_block_outputs_and_gradients(experts_implementation):
    d, h, E, k = 16, 24, 8, 2
    cfg = MixtralConfig(
        hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k
    )
    cfg._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe = moekit.MoEConfig(
        num_experts=E,
        top_k=k,
        experts=moekit.ExpertConfig(hidden=h),
        aux_loss=moekit.AuxLossConfig(switch=0.0),
    ).build(d_model=d)
    with torch.no_grad():
        moe.router.weight_ED.copy_(block.gate.weight)
        moe.experts.w_in_EDH.copy_(block.experts.gate_up_proj.transpose(1, 2))
        moe.experts.w_out_EHD.copy_(block.experts.down_proj.transpose(1, 2))
    x = torch.randn(3, 11, d)
    g = torch.randn(3, 11, d)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_moekit = moe(x1).output
    y_hf = block(x2)
    torch.testing.assert_close(y_moekit, y_hf, rtol=1e-5, atol=1e-6)
    y_moekit.backward(g)
    y_hf.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        moe.router.weight_ED.grad, block.gate.weight.grad, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        moe.experts.w_in_EDH.grad,
        block.experts.gate_up_proj.grad.transpose(1, 2),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        moe.experts.w_out_EHD.grad,
        block.experts.down_proj.grad.transpose(1, 2),
        rtol=1e-5,
        atol=1e-6,
    )
